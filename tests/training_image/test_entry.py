"""The `train` entry point against the SageMaker container contract, on an /opt/ml tree in tmp."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from shared.contracts import PRECISION_ENV
from shared.memory import Layout
from shared.settings import ContractSettings
from training_image import entry, jobs, stopping
from training_image.evaluation import held_out
from training_image.tokens import TokenData
from training_image.modeldir import load_model_dir, save_model_dir
from training_image.precision import computes_in_bf16
from training_image.model import Decoder
from shared.shapes import SIZES

from .conftest import write_hyperparameters

TRAIN = dict(job_type="train", job_id="job-7", turns="2", cycles="2", steps_per_cycle="3", seq_len="32", lr="0.003")


def _run(root: Path, monkeypatch) -> int:
    monkeypatch.setenv("FUSION_ML_ROOT", str(root))
    return entry.main()


def test_train_job_writes_model_metrics_progress_and_metric_lines(ml_root, monkeypatch, capsys):
    write_hyperparameters(ml_root, **TRAIN)
    assert _run(ml_root, monkeypatch) == 0

    model, tokenizer = load_model_dir(ml_root / "model")
    assert model.block_ids == ["0", "1", "2", "3", "3_1"]
    metrics = json.loads((ml_root / "model/metrics.json").read_text())
    assert json.loads((ml_root / "output/data/metrics.json").read_text()) == metrics
    assert metrics["job_id"] == "job-7" and metrics["job_type"] == "train"
    assert metrics["config"] == model.config.model_dump()
    assert (metrics["depth_before"], metrics["depth_after"]) == (4, 5)
    assert metrics["parameters_after"] == model.parameter_count() > metrics["parameters_before"]
    assert metrics["training_tokens"] == 2 * 2 * 3 * 32
    assert metrics["tokens_processed"] == metrics["training_tokens"] * metrics["sequences_per_step"]
    assert metrics["tokens_per_second"] > 0 and metrics["wall_time_s"] > 0
    assert metrics["precision"] == ("bf16" if computes_in_bf16(torch.device("cpu")) else "fp32")
    assert [(c["turn"], c["cycle"], c["steps"], c["tokens"]) for c in metrics["cycles"]] == [
        (1, 1, 3, 96), (1, 2, 3, 96), (2, 1, 3, 96), (2, 2, 3, 96)
    ]
    assert metrics["final_perplexity"] == metrics["cycles"][-1]["perplexity"] < metrics["cycles"][0]["perplexity"]
    # ... measured on the job's held-out windows at its own seq_len, which the metrics name
    data = TokenData(ml_root / "tokens")
    heldout = data.heldout_windows()
    assert metrics["heldout"] == held_out(heldout, "split", data).model_dump()
    assert (metrics["heldout"]["source"], metrics["heldout"]["seq_len"], metrics["heldout"]["tokens"]) == ("split", 32, "all")
    assert metrics["heldout"]["windows"] == len(heldout) > 0
    progress = json.loads((ml_root / "checkpoints/progress.json").read_text())
    assert progress["step"] == progress["total_steps"] == 12 and progress["job_id"] == "job-7"
    lines = capsys.readouterr().out.splitlines()
    assert any(l.startswith("step=12 turn=2 cycle=2 train_loss=") for l in lines)
    last = [l for l in lines if "heldout_perplexity=" in l][-1]
    assert float(last.split("heldout_perplexity=")[1]) == pytest.approx(metrics["final_perplexity"], rel=1e-3)
    assert not (ml_root / "output/failure").exists()


def test_the_layout_the_launcher_sends_reaches_the_trainer(ml_root, monkeypatch, capsys):
    layout = Layout(strategy="fsdp", micro_batch=2, activation_checkpointing=True)
    write_hyperparameters(ml_root, **TRAIN, **layout.hyperparameters())
    assert _run(ml_root, monkeypatch) == 0
    # One process: nothing to shard over, the model trains whole (and saves as it always does).
    assert "fsdp over 1 ranks, micro-batches of 2, recomputing activations" in capsys.readouterr().out
    assert load_model_dir(ml_root / "model")[0].block_ids == ["0", "1", "2", "3", "3_1"]


@pytest.mark.parametrize("setting", ["fp32", "bf16"])
def test_the_precision_setting_forces_the_trainers_and_metrics_records_it(ml_root, monkeypatch, capsys, setting):
    monkeypatch.setenv(PRECISION_ENV, setting)
    write_hyperparameters(ml_root, **{**TRAIN, "turns": "1", "cycles": "1", "steps_per_cycle": "2"})
    assert _run(ml_root, monkeypatch) == 0
    assert json.loads((ml_root / "model/metrics.json").read_text())["precision"] == setting
    assert f"computing in {setting}" in capsys.readouterr().out


def test_a_bad_precision_setting_fails_the_job_naming_it(ml_root, monkeypatch):
    monkeypatch.setenv(PRECISION_ENV, "fp16")
    write_hyperparameters(ml_root, **TRAIN)
    assert _run(ml_root, monkeypatch) == 1
    assert (ml_root / "output/failure").read_text() == f"ValueError: {PRECISION_ENV}='fp16': expected one of auto, fp32, bf16"
    assert not (ml_root / "tokens").exists() and not (ml_root / "model/config.json").exists()


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"seq_len": "1024"}, "ValueError: seq_len=1024 exceeds the base model's context length 512"),
        ({"turns": "zero"}, "turns"),
        ({"job_type": "distill"}, "job_type must be one of"),
    ],
)
def test_bad_input_fails_with_its_reason_in_output_failure(ml_root, monkeypatch, changes, reason):
    write_hyperparameters(ml_root, **{**TRAIN, **changes})
    assert _run(ml_root, monkeypatch) == 1
    assert reason in (ml_root / "output/failure").read_text()
    assert not (ml_root / "model/config.json").exists()


def test_missing_training_data_is_named(ml_root, monkeypatch):
    write_hyperparameters(ml_root, **TRAIN)
    for file in sorted((ml_root / "input/data/training").rglob("*"), reverse=True):
        file.unlink() if file.is_file() else file.rmdir()
    assert _run(ml_root, monkeypatch) == 1
    assert "no text found under" in (ml_root / "output/failure").read_text()


def test_nan_loss_fails_the_job_with_a_clear_reason(ml_root, monkeypatch, tokenizer):
    broken = Decoder(SIZES["debug"]).init_weights(0)
    with torch.no_grad():
        broken.blocks["1"].mlp.up_proj.weight.fill_(float("inf"))
    save_model_dir(ml_root / "input/data/model", broken, tokenizer)
    write_hyperparameters(ml_root, **TRAIN)
    assert _run(ml_root, monkeypatch) == 1
    failure = (ml_root / "output/failure").read_text()
    assert failure.startswith("TrainingDiverged: training diverged: loss=nan") and "lower lr" in failure


def test_contract_jobs_go_to_the_contract_job(ml_root, monkeypatch):
    calls = []
    monkeypatch.setattr(jobs, "run_contract_job",
                        lambda settings, root, job_id, layout: calls.append((settings, root, job_id, layout)))
    # The layout the memory plan chose for the contract job reaches it, as a train job's does.
    write_hyperparameters(ml_root, job_type="contract", job_id="job-9", source_model_id="m-1", contraction_ratio="0.25",
                          strategy="fsdp", micro_batch="2")
    assert _run(ml_root, monkeypatch) == 0
    [(settings, root, job_id, layout)] = calls
    assert settings == ContractSettings(source_model_id="m-1", contraction_ratio=0.25)
    assert (root, job_id) == (ml_root, "job-9")
    assert layout == Layout(strategy="fsdp", micro_batch=2)


def test_torchrun_ranks_come_from_resourceconfig(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for variable in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "FI_PROVIDER", "NCCL_DEBUG", "NCCL_DEBUG_SUBSYS"):
        monkeypatch.delenv(variable, raising=False)
    assert entry.torchrun_command(tmp_path) is None
    assert "FI_PROVIDER" not in os.environ  # one process on one host: no network at all
    config = tmp_path / "input/config"
    config.mkdir(parents=True)
    (config / "resourceconfig.json").write_text(
        json.dumps({"current_host": "algo-2", "hosts": ["algo-1", "algo-2", "algo-3"], "network_interface_name": "eth0"})
    )
    command = entry.torchrun_command(tmp_path)
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert {"--nnodes=3", "--node_rank=1", "--master_addr=algo-1", "-m", "training_image.entry"} <= set(command)
    # Workers get SageMaker's grace, less a margin for torchrun itself to exit, before SIGKILL.
    assert f"--shutdown-timeout={stopping.SHUTDOWN_TIMEOUT}" in command
    assert 60 <= stopping.SHUTDOWN_TIMEOUT < stopping.GRACE_SECONDS == 120
    assert os.environ["NCCL_SOCKET_IFNAME"] == os.environ["GLOO_SOCKET_IFNAME"] == "eth0"
    # Across hosts EFA or nothing; NCCL logs the transport it chose at the first step.
    assert os.environ["FI_PROVIDER"] == "efa"
    assert (os.environ["NCCL_DEBUG"], os.environ["NCCL_DEBUG_SUBSYS"]) == ("INFO", "INIT,NET")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert entry.torchrun_command(tmp_path) is None


def _wait_for_step(root: Path, process: subprocess.Popen, step: int) -> None:
    deadline = time.monotonic() + 60
    progress = root / "checkpoints/progress.json"
    while time.monotonic() < deadline and process.poll() is None:
        if progress.is_file() and json.loads(progress.read_text())["step"] >= step:
            return
        time.sleep(0.02)
    raise AssertionError(f"the run never reached step {step} (exit {process.poll()})")


@pytest.mark.slow
def test_killed_then_terminated_run_resumes_to_the_uninterrupted_weights(ml_root, tmp_path, monkeypatch):
    hyperparameters = {**TRAIN, "cycles": "2", "steps_per_cycle": "6"}
    reference = tmp_path / "reference"
    reference.mkdir()
    for channel in ("model", "training"):
        os.symlink(ml_root / "input/data" / channel, reference / channel)
    reference_root = tmp_path / "ref-ml"
    (reference_root / "input").mkdir(parents=True)
    os.symlink(reference, reference_root / "input/data")
    write_hyperparameters(reference_root, **hyperparameters)
    assert _run(reference_root, monkeypatch) == 0

    write_hyperparameters(ml_root, **hyperparameters)
    env = {**os.environ, "FUSION_ML_ROOT": str(ml_root), "FUSION_CHECKPOINT_EVERY": "2", "OMP_NUM_THREADS": "1"}
    train = [str(Path(sys.executable).with_name("train"))]
    killed = subprocess.Popen(train, env=env, stdout=subprocess.DEVNULL)
    _wait_for_step(ml_root, killed, 3)
    killed.kill()
    killed.wait()
    terminated = subprocess.Popen(train, env=env, stdout=subprocess.DEVNULL)
    _wait_for_step(ml_root, terminated, 12)
    terminated.send_signal(signal.SIGTERM)
    assert terminated.wait(timeout=60) == entry.EXIT_STOPPED
    assert not (ml_root / "output/failure").exists()
    stopped_at = torch.load(ml_root / "checkpoints/checkpoint.pt", weights_only=False)["state"]["step"]
    assert 12 <= stopped_at < 24
    assert _run(ml_root, monkeypatch) == 0

    resumed = load_model_dir(ml_root / "model")[0].state_dict()
    for name, value in load_model_dir(reference_root / "model")[0].state_dict().items():
        assert torch.equal(resumed[name], value), name
