"""The container's files and SageMaker's hyperparameters, as typed once in shared.contracts."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from shared.contracts import LOG_RECORD, METRICS, Hyperparameters, Progress, TrainMetrics
from shared.memory import Layout
from shared.settings import ContractSettings, TrainSettings
from shared.shapes import SIZES

PROGRESS = {"job_id": "j", "job_type": "train", "turn": 1, "turns": 2, "cycle": 3, "cycles": 6, "step": 40,
            "total_steps": 600, "loss": 5.2, "perplexity": None, "tokens_trained": 10240, "tokens_per_second": 900.5,
            "eta_seconds": 12.0, "updated_at": "2026-01-01T00:00:00+00:00"}
CYCLE = {"turn": 1, "cycle": 1, "steps": 3, "loss": 6.1, "heldout_loss": 6.0, "perplexity": 403.4, "tokens": 96}
METRICS_JSON = {"job_id": "j", "job_type": "train", "config": SIZES["debug"].model_dump(mode="json"),
                "parameters_before": 10, "parameters_after": 12, "depth_before": 4, "depth_after": 5,
                "training_tokens": 96, "tokens_processed": 768, "tokens_per_second": 10.0, "wall_time_s": 1.5,
                "sequences_per_step": 8, "cycles": [CYCLE], "final_perplexity": 403.4}


@pytest.mark.parametrize("job", [
    Hyperparameters(job_type="train", job_id="job-1", settings=TrainSettings(turns=2, lr=3e-4, train_steps=40),
                    layout=Layout(strategy="fsdp", micro_batch=2, activation_checkpointing=True)),
    Hyperparameters(job_type="contract", job_id="job-2",
                    settings=ContractSettings(source_model_id="m-9", contraction_ratio=0.25, num_layers_to_contract=2)),
])
def test_hyperparameters_travel_as_strings_and_come_back_whole(job):
    strings = job.strings()
    assert all(isinstance(v, str) for v in strings.values())
    assert Hyperparameters.parse(json.loads(json.dumps(strings))) == job


def test_hyperparameters_take_the_settings_of_their_job_type():
    with pytest.raises(ValidationError, match="a contract job takes ContractSettings"):
        Hyperparameters(job_type="contract", job_id="j", settings=TrainSettings())


def test_a_job_launched_before_layouts_parses_with_the_default_layout():
    strings = Hyperparameters(job_type="train", job_id="j", settings=TrainSettings()).strings()
    old = {k: v for k, v in strings.items() if k not in Layout.model_fields}
    assert Hyperparameters.parse(old).layout == Layout()


def test_the_written_files_validate():
    assert Progress.model_validate_json(json.dumps(PROGRESS)).tokens_trained == 10240
    assert isinstance(METRICS.validate_json(json.dumps(METRICS_JSON)), TrainMetrics)
    assert LOG_RECORD.validate_json(json.dumps({"kind": "eval", "step": 3, "time": "t", **CYCLE})).perplexity == 403.4


@pytest.mark.parametrize("change, field", [
    ({"training_tokens": None}, "training_tokens"),
    ({"training_tokens": True}, "training_tokens"),
    ({"training_tokens": "96"}, "training_tokens"),
    ({"training_tokens": -1}, "training_tokens"),
    ({"config": {"dim": 1}}, "config"),
    ({"job_type": "distill"}, "job_type"),
    ({"layers_contracted": ["1"]}, "layers_contracted"),  # a contract job's field in a train job's file
])
def test_metrics_missing_a_field_or_of_a_wrong_type_are_refused_by_name(change, field):
    document = {k: v for k, v in {**METRICS_JSON, **change}.items() if v is not None}
    with pytest.raises(ValidationError) as refused:
        METRICS.validate_json(json.dumps(document))
    assert field in str(refused.value)


@pytest.mark.parametrize("change", [{"tokens_trained": "x"}, {"tokens_trained": True}, {"tokens_trained": -5},
                                    {"step": None}])
def test_progress_of_a_wrong_type_is_refused(change):
    document = {k: v for k, v in {**PROGRESS, **change}.items() if v is not None}
    with pytest.raises(ValidationError):
        Progress.model_validate_json(json.dumps(document))
