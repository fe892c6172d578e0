"""Each function ships only its own package (functions/Makefile) and imports with the shared layer."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from local.resources import load_template

ROOT = Path(__file__).resolve().parents[2]
FUNCTIONS = {"ApiFunction": "api", "LauncherFunction": "launcher", "EventsFunction": "events",
             "DatasetsFunction": "datasets", "ReconcilerFunction": "reconciler"}


def test_every_function_is_built_by_the_makefile_from_its_own_folder():
    template = load_template()
    assert template["Globals"]["Function"]["CodeUri"] == "functions/"
    for logical, package in FUNCTIONS.items():
        resource = template["Resources"][logical]
        assert resource["Metadata"]["BuildMethod"] == "makefile"
        assert resource["Properties"]["Handler"] == f"functions.{package}.app.lambda_handler"


@pytest.mark.parametrize("logical, package", sorted(FUNCTIONS.items()))
def test_a_built_function_holds_only_its_package_and_imports_with_the_layer(tmp_path, logical, package):
    artifacts, layer = tmp_path / "function", tmp_path / "layer"
    subprocess.run(["make", "-s", "-C", str(ROOT / "functions"), f"build-{logical}", f"ARTIFACTS_DIR={artifacts}"],
                   check=True)
    files = {p.relative_to(artifacts).as_posix() for p in artifacts.rglob("*") if p.is_file()}
    assert f"functions/{package}/app.py" in files
    shipped = ("console/",) if package == "api" else ()  # the API serves the console's static files
    assert all(f.startswith((f"functions/{package}/", "functions/__init__.py", *shipped)) for f in files), files
    if shipped:
        assert {f"console/{p.name}" for p in (ROOT / "console").iterdir()} <= files
    (layer / "shared").mkdir(parents=True)  # what the SharedLayer puts under python/
    for source in list((ROOT / "shared").glob("*.py")) + list((ROOT / "shared").glob("*.json")):
        shutil.copy(source, layer / "shared")
    probe = (f"import functions.{package}.app as m, shared; "
             f"print(m.__file__); print(shared.__file__); m.lambda_handler")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": f"{artifacts}:{layer}", "PATH": "/usr/bin:/bin",
                                 "AWS_DEFAULT_REGION": "us-east-1"}, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    module_file, shared_file = result.stdout.split()
    assert module_file.startswith(str(artifacts)) and shared_file.startswith(str(layer))
