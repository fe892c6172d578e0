"""bench/gpu.sh, the GPU measurement: its dry run takes every path on the CPU (so the script a lent
GPU runs cannot rot), its FLOP count is the one it states, and it brings its own pydantic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bench import deps
from bench.gpu import RUNS, eta_flops_per_token, flops_per_token
from shared.pricing import LLAMA_SHAPES
from shared.shapes import SIZES

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_dry_run_measures_every_run_and_writes_its_figures(tmp_path):
    # As a lent machine runs it: from another folder, with no PYTHONPATH of ours.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(DRY="1", OUT=str(tmp_path), PYTHON=sys.executable)
    result = subprocess.run([str(ROOT / "bench/gpu.sh")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads((tmp_path / "gpu.json").read_text())
    assert [(run["shape"], run["compiled"]) for run in figures["runs"]] == list(RUNS) and not figures["skipped"]
    assert figures["card"] == "CPU (dry run)" and figures["torch"] and figures["transformers"]
    for run in figures["runs"]:
        for loop in ("fusion", "hf"):
            assert run[loop]["tokens_per_second"] > 0
            assert run[loop]["mfu"] == pytest.approx(run[loop]["tokens_per_second"] * run["flops_per_token"] / figures["peak_bf16_flops"])
            # The ETA's FLOPs: 6 x every parameter, no attention.
            assert run[loop]["eta_utilization"] == pytest.approx(run[loop]["tokens_per_second"] * 6 * run["parameters"] / figures["peak_bf16_flops"])
        assert run["ratio_fusion_to_hf"] == pytest.approx(run["fusion"]["tokens_per_second"] / run["hf"]["tokens_per_second"])
    text = (tmp_path / "gpu.txt").read_text()
    assert text.strip() in result.stdout and "llama-1b (debug), compiled" in text


def test_a_run_that_starts_past_the_budget_is_skipped_and_said_so(tmp_path):
    from bench import gpu

    assert gpu.main(["--dry", "--out", str(tmp_path / "gpu"), "--budget-s", "0"]) == 0
    figures = json.loads((tmp_path / "gpu.json").read_text())
    assert figures["runs"] == [] and len(figures["skipped"]) == len(RUNS)
    assert "llama-1b, eager: skipped, the 0 s budget is spent" in (tmp_path / "gpu.txt").read_text()


def test_flops_per_token_count_the_causal_attention():
    llama = LLAMA_SHAPES["llama-1b"]  # tied embeddings: every parameter multiplies
    attention = 6 * 16 * 32 * 64 * 2048
    assert flops_per_token(llama, 2048) == 6 * llama.parameters() + attention
    assert eta_flops_per_token(llama) == 6 * llama.parameters()
    untied = SIZES["debug"]
    assert not untied.tie_embeddings
    assert flops_per_token(untied, 0) == 6 * (untied.parameters() - untied.vocab_size * untied.dim)


def _wheel(folder: Path, name: str, package: str) -> None:
    with zipfile.ZipFile(folder / name, "w") as archive:
        archive.writestr(f"{package}/__init__.py", f"WHEEL = {name!r}\n")


def test_the_carried_wheels_that_fit_the_interpreter_are_unpacked(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    versions = deps.pins()
    for package in deps.PACKAGES:
        if package == deps.COMPILED:
            for tag, machine in (("cp311", "x86_64"), ("cp312", "x86_64"), ("cp312", "aarch64")):
                _wheel(wheels, f"{package}-{versions[package]}-{tag}-{tag}-manylinux2014_{machine}.manylinux_2_17_{machine}.whl", package)
        else:
            _wheel(wheels, f"{package}-{versions[package]}-py3-none-any.whl", package)
    used = deps.unpack(tmp_path / "deps", wheels, python=(3, 12), machine="aarch64")
    assert sorted(used) == sorted(p.name for p in wheels.glob("*.whl") if "cp" not in p.name or "cp312-cp312-manylinux2014_aarch64" in p.name)
    assert "cp312" in (tmp_path / "deps" / deps.COMPILED / "__init__.py").read_text()
    with pytest.raises(SystemExit, match="no wheel of pydantic_core for CPython 3.13 on x86_64"):
        deps.unpack(tmp_path / "other", wheels, python=(3, 13), machine="x86_64")
