"""The files the container writes for the functions, as the real entry point writes them, hold to
the models in shared.contracts that the functions read them with."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from shared.contracts import (LOG_RECORD, METRICS, ContractMetrics, EvalRecord, Hyperparameters, Progress, StepRecord,
                              TrainMetrics)
from shared.memory import Layout
from shared.outputs import metrics_log_key, progress_key, read_metrics, read_metrics_log, read_progress
from shared.settings import ContractSettings, TrainSettings
from training_image import entry


def _run(root: Path, job: Hyperparameters, monkeypatch) -> None:
    """The entry point on `root`, with hyperparameters.json as the launcher writes it."""
    config = root / "input/config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "hyperparameters.json").write_text(json.dumps(job.strings()))
    monkeypatch.setenv("FUSION_ML_ROOT", str(root))
    assert entry.main() == 0, (root / "output/failure").read_text()


def _outputs(root: Path, job_id: str) -> tuple:
    """(metrics.json, progress.json, the metrics log's records), each validated by its model, and
    read back by the functions' own readers from where SageMaker puts them in S3."""
    metrics = METRICS.validate_json((root / "output/data/metrics.json").read_bytes())
    assert METRICS.validate_json((root / "model/metrics.json").read_bytes()) == metrics
    progress = Progress.model_validate_json((root / "checkpoints/progress.json").read_bytes())
    log = [LOG_RECORD.validate_json(line) for line in (root / "checkpoints/metrics.jsonl").read_text().splitlines()]

    # SageMaker's upload of model/ under CompressionType NONE: each file under the model prefix
    objects = {f"jobs/{job_id}/output/model/{path.relative_to(root / 'model').as_posix()}": path.read_bytes()
               for path in (root / "model").rglob("*") if path.is_file()}
    objects |= {progress_key(job_id): (root / "checkpoints/progress.json").read_bytes(),
                metrics_log_key(job_id): (root / "checkpoints/metrics.jsonl").read_bytes()}
    s3 = SimpleNamespace(get_object=lambda Bucket, Key: {"Body": io.BytesIO(objects[Key])})
    assert read_metrics(s3, f"s3://b/jobs/{job_id}/output/model/") == metrics
    assert read_progress(s3, "b", job_id) == progress
    curve = read_metrics_log(s3, "b", job_id)
    for kind, records in (("step", StepRecord), ("eval", EvalRecord)):
        assert curve[kind + "s"] == [r.model_dump(mode="json") for r in log if isinstance(r, records)]
    return metrics, progress, log


@pytest.mark.slow
def test_a_train_job_then_a_contract_job_write_what_the_functions_read(ml_root, tmp_path, monkeypatch):
    settings = TrainSettings(turns=1, cycles=2, steps_per_cycle=2, seq_len=32, lr=0.003)
    _run(ml_root, Hyperparameters(job_type="train", job_id="job-1", settings=settings,
                                  layout=Layout(micro_batch=2)), monkeypatch)
    metrics, progress, log = _outputs(ml_root, "job-1")
    assert isinstance(metrics, TrainMetrics) and metrics.job_id == "job-1"
    assert metrics.training_tokens == settings.training_tokens() == progress.tokens_trained
    assert (progress.job_type, progress.step, progress.total_steps) == ("train", 4, 4)
    assert [r.step for r in log if isinstance(r, StepRecord)] == [2, 4]  # each cycle's end at least
    assert [(r.cycle, r.step) for r in log if isinstance(r, EvalRecord)] == [(1, 2), (2, 4)]

    # The trained model contracted, healing for two steps so that it logs progress too.
    contract_root = tmp_path / "contract"
    (contract_root / "input/data").mkdir(parents=True)
    (contract_root / "input/data/model").symlink_to(ml_root / "model")
    (contract_root / "input/data/training").symlink_to(ml_root / "input/data/training")
    settings = ContractSettings(source_model_id="m-job-1", contraction_ratio=0.25, num_layers_to_contract=1,
                                train_steps=2)
    _run(contract_root, Hyperparameters(job_type="contract", job_id="job-2", settings=settings), monkeypatch)
    metrics, progress, log = _outputs(contract_root, "job-2")
    assert isinstance(metrics, ContractMetrics) and metrics.job_id == "job-2"
    assert metrics.training_tokens == settings.training_tokens() == progress.tokens_trained
    assert metrics.depth_before == metrics.depth_after == 5 and len(metrics.layers_contracted) == 1
    assert metrics.final_perplexity == (metrics.perplexity_after_healing if metrics.healing_kept
                                        else metrics.perplexity_after_pruning)
    assert (progress.job_type, progress.step) == ("contract", 2)
    assert [r.step for r in log if isinstance(r, EvalRecord)] == [2]
