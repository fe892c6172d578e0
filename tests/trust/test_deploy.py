"""What CloudFormation and Lambda would refuse, checked here: the template after the SAM transform
lints clean (the cycle check among the rest), `sam build` builds it, and each built function
imports its handler from the build output and the layer alone, within Lambda's size limit."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from local.resources import load_template
from local.sam import transformed

ROOT = Path(__file__).resolve().parents[2]
SAM_VENV = ROOT / ".venv-sam" / "bin"
LAMBDA_UNZIPPED_LIMIT = 250 * 1024 * 1024  # a function and all its layers, unzipped
# What the Lambda runtime itself provides to Python functions.
RUNTIME_PACKAGES = ("boto3", "botocore", "s3transfer", "jmespath", "urllib3", "dateutil", "six.py")


def _functions() -> dict[str, str]:
    return {name: r["Properties"]["Handler"] for name, r in load_template()["Resources"].items()
            if r["Type"] == "AWS::Serverless::Function"}


def _runtime() -> str:
    return load_template()["Globals"]["Function"]["Runtime"]


def _lint(*paths: Path) -> str:
    done = subprocess.run([str(SAM_VENV / "cfn-lint"), "--format", "parseable", "--ignore-checks", "W2001", "--",
                           *map(str, paths)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode in (0, 2, 4, 6, 8, 10, 12, 14), done.stderr[-2000:]  # cfn-lint's exit codes are bit flags
    return done.stdout


@pytest.mark.slow
def test_the_transformed_template_lints_clean_and_a_cycle_would_not(tmp_path):
    assert SAM_VENV.exists(), "run `make .venv-sam/.installed` (make test does) to install aws-sam-cli"
    good = tmp_path / "template.json"
    good.write_text(json.dumps(transformed()))
    # The cycle CloudFormation once refused: every function (so the dataset check too) given the
    # training role, which names the data bucket, whose notifications name the dataset check.
    source = (ROOT / "template.yaml").read_text()
    cyclic_source = tmp_path / "cyclic.yaml"
    cyclic_source.write_text(source.replace(
        "        FUSION_USE_SPOT: !Ref UseSpot\n",
        "        FUSION_USE_SPOT: !Ref UseSpot\n        SAGEMAKER_ROLE_ARN: !GetAtt SageMakerExecutionRole.Arn\n", 1))
    cyclic = tmp_path / "cyclic.json"
    cyclic.write_text(json.dumps(transformed(cyclic_source)))
    report = _lint(good, cyclic)
    print(f"\ncfn-lint on the transformed template: {report.count(str(good)) or 'no'} findings")
    assert str(good) not in report, report
    assert re.search(rf"{re.escape(str(cyclic))}:.*:E3004:", report), report


def test_the_layer_is_built_for_the_functions_runtime():
    makefile = (ROOT / "shared" / "Makefile").read_text()
    version = re.search(r"^LAMBDA_PYTHON := (\S+)$", makefile, re.M).group(1)
    assert _runtime() == f"python{version}"
    assert load_template()["Resources"]["SharedLayer"]["Properties"]["CompatibleRuntimes"] == [_runtime()]


def _lambda_python() -> str:
    """An interpreter of the functions' runtime version: one pyenv built, or one on PATH (not a
    pyenv shim, which answers only for the selected versions)."""
    name = _runtime()
    built = sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{name.removeprefix('python')}*/bin/{name}")))
    on_path = shutil.which(name)
    found = built[-1] if built else (on_path if on_path and "/shims/" not in on_path else None)
    assert found, f"no {name} on PATH or under ~/.pyenv: the built functions cannot be imported as Lambda would"
    return found


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sam") / "build"
    done = subprocess.run([str(SAM_VENV / "sam"), "build", "--build-in-source", "--template-file", "template.yaml", "--build-dir", str(out),
                           "--cache-dir", str(out.parent / "cache")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "SAM_CLI_TELEMETRY": "0"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_sam_builds_every_function_and_each_imports_from_its_build_and_the_layer_alone(built, tmp_path):
    import boto3

    # The runtime's own packages (boto3 and what it needs), and nothing else of this virtualenv.
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    site = Path(boto3.__file__).parents[1]
    for package in RUNTIME_PACKAGES:
        (runtime / package).symlink_to(site / package)
    layer = built / "SharedLayer" / "python"
    layer_size = _size(built / "SharedLayer")
    python = _lambda_python()
    print(f"\nSharedLayer: {layer_size / 2**20:.1f} MiB unzipped; built for {_runtime()}, imported with {python}")
    for function, handler in sorted(_functions().items()):
        code = built / function
        size = _size(code) + layer_size
        print(f"{function}: {_size(code) / 2**10:.0f} KiB + layer = {size / 2**20:.1f} MiB of "
              f"{LAMBDA_UNZIPPED_LIMIT / 2**20:.0f} MiB")
        assert size < LAMBDA_UNZIPPED_LIMIT
        module, attribute = handler.rsplit(".", 1)
        # -S: no site-packages; the paths Lambda puts on sys.path: the code, the layer, the runtime.
        probe = (f"import sys; sys.path[:0] = {[str(code), str(layer), str(runtime)]!r}; "
                 f"import {module} as m, shared, aws_xray_sdk.core; callable(m.{attribute}) or sys.exit('not callable'); "
                 f"print(m.__file__, shared.__file__)")
        done = subprocess.run([python, "-S", "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                              env={"PATH": "/usr/bin:/bin", "AWS_DEFAULT_REGION": "us-east-1",
                                   **_environment()})
        assert done.returncode == 0, f"{function}: {done.stderr[-2000:]}"
        module_file, shared_file = done.stdout.split()
        assert module_file.startswith(str(code)) and shared_file.startswith(str(layer))
    # The SageMaker SDK is the CLI's deploy extra: no function or layer ships it.
    assert not [p for p in built.rglob("sagemaker*") if p.is_dir()]


def _environment() -> dict[str, str]:
    """The functions' environment: the template's literal settings as they are (a log level must be
    one), a placeholder for each value CloudFormation fills in."""
    from local.resources import function_environment

    return {k: v if isinstance(v, str) else "x" for k, v in function_environment(load_template()).items()}
