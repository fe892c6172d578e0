"""Every setting's default and bounds (docs/architecture.md §2), and the SageMaker hyperparameter round trip."""

import pytest
from pydantic import ValidationError

from shared.settings import (
    JOB_REQUEST,
    MAX_HEALING_STEPS,
    MAX_LAYERS,
    MAX_STEPS_PER_TURN,
    ContractSettings,
    TrainSettings,
    default_output_name,
    from_hyperparameters,
    to_hyperparameters,
)

CONTRACT_REQUIRED = {"source_model_id": "m-1"}

# (settings class, field, default, accepted edge values, rejected values)
BOUNDS = [
    (TrainSettings, "turns", 1, [1, 10], [0, 11, 1.5, 1.0, "two", "2", True]),
    (TrainSettings, "cycles", 6, [1, 100], [0, 101]),
    (TrainSettings, "steps_per_cycle", 1000, [1, 100_000], [0, 100_001]),
    (TrainSettings, "lr", 1e-4, [1e-12, 1.0, 1], [0, -1e-4, 1.0001, True, "0.1"]),
    (TrainSettings, "seq_len", 256, [16, 8192], [15, 8193]),
    (TrainSettings, "train_steps", None, [1, MAX_STEPS_PER_TURN], [0, -5, MAX_STEPS_PER_TURN + 1, 10**30]),
    (TrainSettings, "output_name", None, ["a", "A-z.0_9", "x" * 64], ["", "x" * 65, "has space", "a/b"]),
    (ContractSettings, "contraction_ratio", 0.5, [0.1, 0.9], [0.09, 0.91, "0.5", True]),
    (ContractSettings, "num_layers_to_contract", 8, [1, MAX_LAYERS], [0, -1, MAX_LAYERS + 1, "8"]),
    (ContractSettings, "train_steps", 0, [0, MAX_HEALING_STEPS], [-1, MAX_HEALING_STEPS + 1, 10**30]),
    (ContractSettings, "output_name", None, ["support-bot-v2"], ["", "é"]),
    (ContractSettings, "source_model_id", None, ["m", "x" * 128], ["", "x" * 129]),
]


def _make(cls, **values):
    base = CONTRACT_REQUIRED if cls is ContractSettings else {}
    return cls.model_validate({**base, **values})


@pytest.mark.parametrize("cls, field, default, ok, bad", BOUNDS, ids=[f"{b[0].__name__}.{b[1]}" for b in BOUNDS])
def test_setting_default_and_bounds(cls, field, default, ok, bad):
    if field != "source_model_id":
        assert getattr(_make(cls), field) == default
    for value in ok:
        assert getattr(_make(cls, **{field: value}), field) == value
    for value in bad:
        with pytest.raises(ValidationError) as info:
            _make(cls, **{field: value})
        assert info.value.errors()[0]["loc"] == (field,)


def test_source_model_id_is_required():
    with pytest.raises(ValidationError) as info:
        ContractSettings()
    assert info.value.errors()[0]["type"] == "missing"


@pytest.mark.parametrize("cls", [TrainSettings, ContractSettings])
def test_unknown_settings_are_rejected(cls):
    with pytest.raises(ValidationError) as info:
        _make(cls, learning_rate=0.1)
    assert info.value.errors()[0]["type"] == "extra_forbidden"


def test_training_tokens_follow_the_cost_equation():
    assert TrainSettings().training_tokens() == 1 * 6 * 1000 * 256
    assert TrainSettings(turns=3, cycles=2, steps_per_cycle=700, seq_len=512).training_tokens() == 3 * 2 * 700 * 512
    assert TrainSettings(turns=2, train_steps=50, seq_len=64).training_tokens() == 2 * 50 * 64
    assert ContractSettings(source_model_id="m", train_steps=10).training_tokens() == 10 * 256


def test_under_training_warning_below_500_steps():
    assert TrainSettings(steps_per_cycle=499).warnings()
    assert not TrainSettings(steps_per_cycle=500).warnings()
    assert not TrainSettings(steps_per_cycle=10, train_steps=10).warnings()


def test_job_request_discriminates_on_type():
    train = JOB_REQUEST.validate_python({"type": "train", "model": "base-debug", "dataset": "ds-1"})
    assert train.hyperparams == TrainSettings()
    contract = JOB_REQUEST.validate_python({"type": "contract", "hyperparams": CONTRACT_REQUIRED})
    assert contract.hyperparams.source_model_id == "m-1"
    with pytest.raises(ValidationError):
        JOB_REQUEST.validate_python({"type": "grow", "model": "base-debug", "dataset": "ds-1"})


@pytest.mark.parametrize("settings", [
    TrainSettings(turns=2, lr=3e-4, train_steps=40, output_name="x"),
    ContractSettings(source_model_id="m-9", contraction_ratio=0.25, num_layers_to_contract=2),
])
def test_hyperparameters_are_strings_and_round_trip(settings):
    job_type = "train" if isinstance(settings, TrainSettings) else "contract"
    hyper = to_hyperparameters(job_type, "job-1", settings)
    assert all(isinstance(v, str) for v in hyper.values())
    assert from_hyperparameters(hyper) == (job_type, "job-1", settings)


def test_default_output_name():
    assert default_output_name("abc") == "model-abc"


def test_the_container_takes_the_job_ids_the_service_makes_and_no_others():
    from shared.lifecycle import new_job_id

    hyper = to_hyperparameters("train", new_job_id(), TrainSettings())
    assert from_hyperparameters(hyper)[1] == hyper["job_id"]
    for job_id in ("Job-1", "x" * 41, "", "a/b"):
        with pytest.raises(ValueError, match="job_id must match"):
            from_hyperparameters({**hyper, "job_id": job_id})


def test_train_steps_alone_run_as_one_cycle_and_the_settings_say_so():
    """train_steps replaces cycles x steps_per_cycle: alone, it is one cycle of that many steps
    (one warm-up, one decay, one held-out evaluation), not the default cycles each a sliver of it."""
    alone = TrainSettings.model_validate_json('{"train_steps": 12}')
    assert (alone.cycles, alone.cycle_steps(), alone.training_tokens()) == (1, [12], 12 * alone.seq_len)
    split = TrainSettings(train_steps=12, cycles=3)
    assert split.cycle_steps() == [4, 4, 4] and split.training_tokens() == alone.training_tokens()
    assert TrainSettings().cycle_steps() == [1000] * 6  # without train_steps nothing changes
    assert TrainSettings.model_validate(alone.model_dump()).cycle_steps() == [12]  # as stored, as run
