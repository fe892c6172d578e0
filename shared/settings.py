"""Job settings: the public contract of `POST /jobs` (the `hyperparams` object).

One pydantic model per job type, unknown keys rejected. The API validates requests with these
models and the training container parses SageMaker's all-string `hyperparameters.json` with the
very same models, so a setting has one default and one range everywhere.

Request bodies are validated strictly (a JSON `true` is not the integer 1, `"2"` is not 2, `1.0`
is not an integer, a string is not a ratio); only the container, whose input SageMaker made all
strings, parses leniently. Every number has an upper bound, so every job has a price.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from shared.lifecycle import JOB_ID_PATTERN

# A name a tenant gives: a model's (output_name) or a dataset's.
NAME_CHARACTERS = "A-Za-z0-9._-"
NAME_MAX_LENGTH = 64
NAME_PATTERN = rf"^[{NAME_CHARACTERS}]{{1,{NAME_MAX_LENGTH}}}$"
NAME_RULE = f"1-{NAME_MAX_LENGTH} of A-Z a-z 0-9 . _ -"
UNDER_TRAINING_STEPS = 500  # below this many steps per cycle a run under-trains
CONTRACT_SEQ_LEN = 256  # window length of contraction's calibration and healing steps
# A contract job's forward-only passes, which its price counts too: a calibration sample (Block
# Influence and activation statistics) and a held-out perplexity of the source, the pruned and the
# healed model, each on at most CONTRACT_HELDOUT_WINDOWS windows.
# 512 windows (131,072 tokens) give the refit of a 1536-wide MLP enough rows: on SmolLM2's own
# blocks, 64 left +4.99% at ratio 0.25 and 256 +3.76%; with the sequential refit, 512 gained
# 0.2, 0.7 and 1.1 points over 256 at ratios 0.25, 0.5 and 0.75 (docs/evaluation.md).
CONTRACT_CALIBRATION_WINDOWS = 512
# Passes over the calibration sample, at most: Block Influence, the activation statistics, and the
# reconstruction's two streams side by side (the source's and the contracted model's).
CONTRACT_CALIBRATION_PASSES = 4
CONTRACT_HELDOUT_WINDOWS = 512
CONTRACT_EVALUATIONS = 3

# Upper bounds. A turn's steps, however given, are at most what the largest cycles x
# steps_per_cycle make; a contraction heals for at most one such cycle and prunes at most as
# many layers as any model may have.
MAX_TURNS = 10
MAX_CYCLES = 100
MAX_STEPS_PER_CYCLE = 100_000
MAX_STEPS_PER_TURN = MAX_CYCLES * MAX_STEPS_PER_CYCLE
MAX_SEQ_LEN = 8192
MAX_HEALING_STEPS = MAX_STEPS_PER_CYCLE
MAX_LAYERS = 1024
STRICT = ConfigDict(extra="forbid", strict=True)

OutputName = Annotated[
    str | None,
    Field(
        default=None,
        pattern=NAME_PATTERN,
        description=f"Catalog name of the new model: {NAME_RULE}. Default: model-<job id>.",
        examples=["support-bot-v2"],
    ),
]


class TrainSettings(BaseModel):
    """Settings of a `train` job: grow the base model once, then train it in turns of cycles."""

    model_config = STRICT

    turns: int = Field(
        default=1,
        ge=1,
        le=MAX_TURNS,
        description="Complete training passes; each continues from the last. The primary lever on "
        "quality, time and cost: 1 fast, 2 recommended, 3 best with diminishing returns.",
    )
    output_name: OutputName
    cycles: int = Field(default=6, ge=1, le=MAX_CYCLES, description="Learning-rate cycles per turn.")
    steps_per_cycle: int = Field(
        default=1000,
        ge=1,
        le=MAX_STEPS_PER_CYCLE,
        description="Optimizer steps per cycle. Keep near 1000; below 500 under-trains (accepted with a warning).",
    )
    lr: float = Field(default=1e-4, gt=0, le=1, description="Peak learning rate of each cycle.")
    seq_len: int = Field(
        default=256,
        ge=16,
        le=MAX_SEQ_LEN,
        description="Tokens per training sequence; at most the base model's context length.",
    )
    train_steps: int | None = Field(
        default=None,
        ge=1,
        le=MAX_STEPS_PER_TURN,
        description="Overrides cycles x steps_per_cycle as the optimizer steps of each turn: one "
        "cycle of train_steps steps, or split into cycles when cycles is given too.",
    )

    @model_validator(mode="before")
    @classmethod
    def _train_steps_alone_are_one_cycle(cls, data: Any) -> Any:
        """train_steps without cycles runs as one cycle (one warm-up, one decay, one evaluation),
        not as the default cycles each a sliver of it; the settings then say so (cycles=1)."""
        if isinstance(data, dict) and data.get("train_steps") is not None and "cycles" not in data:
            return {**data, "cycles": 1}
        return data

    def steps_per_turn(self) -> int:
        return self.train_steps if self.train_steps is not None else self.cycles * self.steps_per_cycle

    def cycle_steps(self) -> list[int]:
        """Optimizer steps of each cycle of one turn; they add up to steps_per_turn().

        With train_steps set, the steps are spread as evenly as whole steps allow (earlier cycles
        take the remainder); a train_steps below cycles gives that many one-step cycles.
        """
        if self.train_steps is None:
            return [self.steps_per_cycle] * self.cycles
        cycles = min(self.cycles, self.train_steps)
        base, extra = divmod(self.train_steps, cycles)
        return [base + (1 if i < extra else 0) for i in range(cycles)]

    def training_tokens(self) -> int:
        """The billed token count: turns x steps per turn x seq_len (docs/architecture.md §5)."""
        return self.turns * self.steps_per_turn() * self.seq_len

    def schedule(self) -> str:
        """What runs, in words: turns, cycles and the steps of each ("1 turn × 1 cycle × 12 steps")."""
        steps = self.cycle_steps()
        turns = f"{self.turns} turn{'s' * (self.turns != 1)}"
        cycles = f"{len(steps)} cycle{'s' * (len(steps) != 1)}"
        if len(set(steps)) == 1:
            return f"{turns} × {cycles} × {steps[0]:,} step{'s' * (steps[0] != 1)}"
        return f"{turns} × {cycles} of {max(steps):,} or {min(steps):,} steps ({sum(steps):,} a turn)"

    def warnings(self) -> list[str]:
        if self.train_steps is None and self.steps_per_cycle < UNDER_TRAINING_STEPS:
            return [
                f"steps_per_cycle={self.steps_per_cycle} is below {UNDER_TRAINING_STEPS}: "
                "the run under-trains; keep it near 1000"
            ]
        return []


class ContractSettings(BaseModel):
    """Settings of a `contract` job: prune a trained model into a smaller one."""

    model_config = STRICT

    source_model_id: str = Field(
        min_length=1,
        max_length=128,
        description="The trained model to shrink (a model in your catalog). It is never modified.",
    )
    contraction_ratio: float = Field(
        default=0.5,
        ge=0.1,
        le=0.9,
        description="Fraction of MLP units and attention heads removed in each targeted layer: "
        "0.25 conservative, 0.5 balanced, 0.75 aggressive.",
        json_schema_extra={"x-marks": {"0.25": "conservative", "0.5": "balanced", "0.75": "aggressive"}},
    )
    num_layers_to_contract: int = Field(
        default=8, ge=1, le=MAX_LAYERS, description="How many layers to prune; at most the source model's depth."
    )
    train_steps: int = Field(
        default=0,
        ge=0,
        le=MAX_HEALING_STEPS,
        description="Optional healing steps after pruning, billed as train_steps x seq_len tokens.",
    )
    output_name: OutputName

    def training_tokens(self) -> int:
        return self.train_steps * CONTRACT_SEQ_LEN

    def schedule(self) -> str:
        """What runs, in words: the pruning, then the healing steps if any."""
        layers = f"{self.num_layers_to_contract} layer{'s' * (self.num_layers_to_contract != 1)}"
        healing = f"{self.train_steps:,} healing step{'s' * (self.train_steps != 1)}" if self.train_steps else "no healing"
        return f"prune {self.contraction_ratio:g} of {layers}, then {healing}"

    def warnings(self) -> list[str]:
        return []


# An evaluation job: every model on the same windows of one dataset, forward passes only.
# Where its windows come from (shared.contracts.HeldOut.source names them with a train job's validation set).
EvaluationSource = Literal["split", "dataset"]
EVALUATION_WINDOWS = 256  # windows measured by default: 65,536 tokens at seq_len 256
MAX_EVALUATION_WINDOWS = 4096
MAX_EVALUATED_MODELS = 8  # each model is an input channel of the training job (SageMaker allows 20)


class EvaluateSettings(BaseModel):
    """Settings of an `evaluate` job: measure models side by side on the same windows of one dataset."""

    model_config = STRICT

    model_ids: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        min_length=1,
        max_length=MAX_EVALUATED_MODELS,
        description=f"The models to measure (yours or base models), 1-{MAX_EVALUATED_MODELS}, each once.",
        examples=[["m-abc", "m-def"]],
    )
    seq_len: int = Field(
        default=256,
        ge=16,
        le=MAX_SEQ_LEN,
        description="Tokens predicted per window, the same for every model; at most each model's context length.",
    )
    source: EvaluationSource = Field(
        default="split",
        description="split: the windows held out of the dataset at this seq_len (those a train job on it at this "
        "seq_len never trains on and measures its perplexity on); dataset: a seeded sample of all its windows (a "
        "dataset kept for evaluation, drawn as a train job draws its validation set's).",
    )
    max_windows: int = Field(
        default=EVALUATION_WINDOWS,
        ge=1,
        le=MAX_EVALUATION_WINDOWS,
        description="At most this many windows are measured (the first of the split in order, or a sample of this "
        "many); the price counts them all, the bill what ran.",
    )

    @model_validator(mode="after")
    def _each_model_once(self) -> "EvaluateSettings":
        if len(set(self.model_ids)) != len(self.model_ids):
            raise ValueError("model_ids names a model twice")
        return self

    def training_tokens(self) -> int:
        return 0

    def evaluated_tokens(self) -> int:
        """The forward tokens priced: every model on max_windows windows of seq_len predicted tokens."""
        return len(self.model_ids) * self.max_windows * self.seq_len

    def schedule(self) -> str:
        """What runs, in words: forward passes only, the same windows for every model."""
        models = f"{len(self.model_ids)} model{'s' * (len(self.model_ids) != 1)}"
        return f"{models} x at most {self.max_windows:,} windows of {self.seq_len:,} tokens ({self.source}), no training"

    def warnings(self) -> list[str]:
        return []


class TrainJobRequest(BaseModel):
    """Body of `POST /jobs` for a train job."""

    model_config = STRICT

    type: Literal["train"]
    model: str = Field(min_length=1, max_length=128, description="Base model id (a catalog model).")
    dataset: str = Field(min_length=1, max_length=1024, description="Dataset id or S3 URI of the training data.")
    validation_dataset: str | None = Field(
        default=None, min_length=1, max_length=1024,
        description="Dataset id or S3 URI of a validation set of the same kind (text or conversations): "
        "held-out loss and perplexity are measured on it, and all of `dataset` is trained on. Default: a "
        "held-out split of `dataset`.",
    )
    hyperparams: TrainSettings = Field(default_factory=TrainSettings)


class ContractJobRequest(BaseModel):
    """Body of `POST /jobs` for a contract job."""

    model_config = STRICT

    type: Literal["contract"]
    hyperparams: ContractSettings
    dataset: str | None = Field(
        default=None,
        max_length=1024,
        description="Calibration data; default: the dataset the source model was trained on.",
    )


class EvaluateJobRequest(BaseModel):
    """Body of `POST /jobs` for an evaluation job."""

    model_config = STRICT

    type: Literal["evaluate"]
    dataset: str = Field(min_length=1, max_length=1024, description="Dataset id or S3 URI of the text to measure on.")
    hyperparams: EvaluateSettings


JobRequest = Annotated[Union[TrainJobRequest, ContractJobRequest, EvaluateJobRequest], Field(discriminator="type")]
JOB_REQUEST = TypeAdapter(JobRequest)
JobSettings = TrainSettings | ContractSettings | EvaluateSettings

SETTINGS_BY_TYPE: dict[str, type[TrainSettings] | type[ContractSettings] | type[EvaluateSettings]] = {
    "train": TrainSettings,
    "contract": ContractSettings,
    "evaluate": EvaluateSettings,
}

def to_hyperparameters(job_type: str, job_id: str, settings: JobSettings) -> dict[str, str]:
    """SageMaker's HyperParameters map: every value a string (None values are left out)."""
    out = {"job_type": job_type, "job_id": job_id}
    for key, value in settings.model_dump(exclude_none=True).items():
        out[key] = value if isinstance(value, str) else json.dumps(value)
    return out


def from_hyperparameters(raw: dict[str, Any]) -> tuple[str, str, JobSettings]:
    """Parse hyperparameters.json back into (job_type, job_id, settings) with the API's models
    (a list travels as its JSON text: lax parsing reads numbers from strings, not lists)."""
    values = {k: json.loads(v) if isinstance(v, str) and v.startswith("[") else v for k, v in raw.items()}
    job_type = str(values.pop("job_type", ""))
    job_id = str(values.pop("job_id", ""))
    if job_type not in SETTINGS_BY_TYPE:
        raise ValueError(f"job_type must be one of {sorted(SETTINGS_BY_TYPE)}, got {job_type!r}")
    if not JOB_ID_PATTERN.fullmatch(job_id):
        raise ValueError(f"job_id must match {JOB_ID_PATTERN.pattern}, got {job_id!r}")
    return job_type, job_id, SETTINGS_BY_TYPE[job_type].model_validate(values, strict=False)


# A tuning's trial is a short proxy of its full run: this fraction of the run's steps (shared.tunings).
MIN_PROXY_FRACTION = 0.01
MAX_PROXY_FRACTION = 0.5


def proxy_settings(settings: TrainSettings, fraction: float) -> TrainSettings:
    """The short proxy of a run: the same model, data, turns, cycles, lr and seq_len, each turn cut to
    `fraction` of its steps (at least one a cycle), so it trains about `fraction` of the run's tokens
    on a schedule of the same shape (a warm-up and a cosine decay a cycle, an evaluation at each end)."""
    if not MIN_PROXY_FRACTION <= fraction <= MAX_PROXY_FRACTION:
        raise ValueError(f"proxy_fraction must lie in [{MIN_PROXY_FRACTION}, {MAX_PROXY_FRACTION}], got {fraction}")
    steps = max(settings.cycles, round(fraction * settings.steps_per_turn()))
    return settings.model_copy(update={"train_steps": steps})


def default_output_name(job_id: str) -> str:
    return f"model-{job_id}"
