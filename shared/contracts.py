"""The files the training container and the functions exchange, each typed once (docs/architecture.md §7).

- `Hyperparameters`: what the launcher puts in CreateTrainingJob's HyperParameters and the
  container reads back from hyperparameters.json (every value a string in transit).
- `Progress`: checkpoints/progress.json, the trainer's latest point, rewritten as it trains.
- `LogRecord`: one line of checkpoints/metrics.jsonl, the trainer's curve, appended as it trains.
- `Metrics`: metrics.json (METRICS_FILE), the outcome of a finished job (in model/ and in output/data/).

The container writes each through its model and the functions read each through the same one,
so a field the writer drops or retypes fails the reader's validation, by name, instead of
surfacing as a KeyError or a wrong bill. No torch here: the functions import this module too.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from shared.memory import Layout
from shared.settings import (
    SETTINGS_BY_TYPE,
    EvaluationSource,
    JobSettings,
    TrainSettings,
    from_hyperparameters,
    proxy_settings,
    to_hyperparameters,
)
from shared.shapes import ModelConfig

METRICS_FILE = "metrics.json"  # a finished job's Metrics, in its model directory and output/data/

JobType = Literal["train", "contract", "evaluate"]
# Written by one side and read by the other: nothing unknown, nothing coerced (a JSON true is no count).
CONTRACT = ConfigDict(extra="forbid", strict=True, frozen=True)
Count = Annotated[int, Field(ge=0)]

# Whether a job computes in bf16 is the container's environment variable PRECISION_ENV (the
# launcher sets it from the stack's TrainingPrecision): "auto", the default, autocasts to bf16
# where the hardware multiplies bf16 natively (CUDA GPUs that have it, CPUs with AVX512-BF16 or
# AMX) and stays fp32 elsewhere; "fp32" and "bf16" force one. metrics.json records the outcome.
PRECISION_ENV = "FUSION_PRECISION"
Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
ComputePrecision = Literal["fp32", "bf16"]


class Hyperparameters(BaseModel):
    """A job as the container receives it: its type, its id, its settings and how to lay it out."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_type: JobType
    job_id: str
    settings: JobSettings
    layout: Layout = Layout()
    # A tuning's trial: train this fraction of the run `settings` describe (shared.settings.proxy_settings).
    proxy_fraction: float | None = None

    @model_validator(mode="after")
    def _settings_of_the_type(self) -> "Hyperparameters":
        expected = SETTINGS_BY_TYPE[self.job_type]
        if not isinstance(self.settings, expected):
            raise ValueError(f"a {self.job_type} job takes {expected.__name__}")
        if self.proxy_fraction is not None:
            if not isinstance(self.settings, TrainSettings):
                raise ValueError("only a train job has a proxy")
            proxy_settings(self.settings, self.proxy_fraction)  # in range, else ValueError
        return self

    def run_settings(self) -> JobSettings:
        """What the container runs: the settings, or their proxy for a tuning's trial."""
        if self.proxy_fraction is None:
            return self.settings
        return proxy_settings(self.settings, self.proxy_fraction)

    def strings(self) -> dict[str, str]:
        """SageMaker's HyperParameters map: the settings' and the layout's keys side by side."""
        out = {**to_hyperparameters(self.job_type, self.job_id, self.settings), **self.layout.hyperparameters()}
        if self.proxy_fraction is not None:
            out[PROXY_FRACTION_KEY] = repr(self.proxy_fraction)
        return out

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> "Hyperparameters":
        """hyperparameters.json back into the job (a job launched before layouts has the default one)."""
        layout, rest = Layout.split(raw)
        fraction = rest.pop(PROXY_FRACTION_KEY, None)
        job_type, job_id, settings = from_hyperparameters(rest)
        return cls(job_type=job_type, job_id=job_id, settings=settings, layout=layout,
                   proxy_fraction=float(fraction) if fraction is not None else None)


PROXY_FRACTION_KEY = "proxy_fraction"


class Progress(BaseModel):
    """checkpoints/progress.json: where a running job is; turn and cycle count from 1."""

    model_config = CONTRACT

    job_id: str
    job_type: JobType
    turn: int
    turns: int
    cycle: int
    cycles: int
    step: Count
    total_steps: Count
    loss: float | None
    perplexity: float | None
    tokens_trained: Count  # what a cancelled job is billed for
    tokens_per_second: float
    eta_seconds: float
    updated_at: str


class Cycle(BaseModel):
    """One learning-rate cycle's end: its mean training loss and, with held-out data, its evaluation."""

    model_config = CONTRACT

    turn: int
    cycle: int
    steps: Count
    loss: float
    heldout_loss: float | None
    perplexity: float | None
    tokens: Count


class StepRecord(BaseModel):
    """A metrics.jsonl line for one logged optimizer step."""

    model_config = CONTRACT

    kind: Literal["step"]
    step: Count
    turn: int
    cycle: int
    loss: float
    lr: float
    time: str


class EvalRecord(Cycle):
    """A metrics.jsonl line for a cycle's end, at the step it ended on."""

    kind: Literal["eval"]
    step: Count
    time: str


LogRecord = Annotated[Union[StepRecord, EvalRecord], Field(discriminator="kind")]
LOG_RECORD = TypeAdapter(LogRecord)


class HeldOut(BaseModel):
    """What a perplexity was measured on: which windows of which dataset, of seq_len tokens, scored
    on every token or on the assistant's tokens of conversations, and a digest of those windows.

    A perplexity means something only with its windows: the same model scores differently on
    another split, another tokenizer or chat template, or another seq_len (a window of 128 tokens
    predicts its tokens with less context than one of 256). Two perplexities compare only when
    their digests agree: the same tokens, the same targets scored."""

    model_config = CONTRACT

    # validation: the validation set a train job named (a seeded sample of all its windows);
    # split: the windows held out of the job's dataset at this seq_len (a seeded 5%, which a train
    # job at this seq_len never trains on); dataset: a seeded sample of all the windows of the
    # dataset an evaluate job names (drawn as a validation set's are).
    source: Literal["validation", EvaluationSource]
    dataset: str | None = None  # the dataset id or URI (filled in where the job is known)
    windows: Count
    seq_len: Count
    tokens: Literal["all", "assistant"]
    # sha256 of the windows as measured (their token ids and which targets count), in order; None in
    # the metrics of images from before it was recorded, which then compare with nothing.
    sha256: str | None = None

    def compares_with(self, other: "HeldOut | None") -> bool:
        """Whether a perplexity measured on these windows compares with one measured on `other`."""
        return other is not None and self.sha256 is not None and self.sha256 == other.sha256


class _Outcome(BaseModel):
    model_config = CONTRACT

    job_id: str
    config: ModelConfig
    parameters_before: Count
    parameters_after: Count
    depth_before: Count
    depth_after: Count
    training_tokens: Count  # what a completed job is billed for
    tokens_processed: Count
    tokens_per_second: float
    wall_time_s: float
    cycles: list[Cycle]
    final_perplexity: float | None
    # What the job's matmuls computed in (PRECISION_ENV resolved on its hardware); None in the
    # metrics of images from before it was recorded.
    precision: ComputePrecision | None = None
    heldout: HeldOut | None = None  # where final_perplexity was measured (None: a job from before it was said)


class TrainMetrics(_Outcome):
    """metrics.json of a train job."""

    job_type: Literal["train"]
    sequences_per_step: Count


class ContractMetrics(_Outcome):
    """metrics.json of a contract job: the blocks it pruned and the perplexity at each stage."""

    job_type: Literal["contract"]
    layers_contracted: list[str]
    contraction_ratio: float
    block_influence: dict[str, float]
    perplexity_before: float  # the source's, on the same windows as the pruned and healed model's
    perplexity_after_pruning: float
    perplexity_after_healing: float | None
    # Whether model/ holds the healed weights (final_perplexity is then perplexity_after_healing);
    # False when healing raised held-out perplexity and the pruned weights were delivered; None
    # when the job did not heal.
    healing_kept: bool | None


class Evaluated(BaseModel):
    """One model's row of an evaluation: its loss on the windows the row names."""

    model_config = CONTRACT

    model_id: str
    parameters: Count
    perplexity_on: HeldOut
    target_tokens: Count  # the targets scored: every predicted token, or only the assistant's on chat data
    loss: float  # mean cross-entropy over target_tokens (nats): on chat data, the assistant's tokens' loss
    perplexity: float  # exp(loss)


class EvaluateMetrics(BaseModel):
    """metrics.json of an evaluate job: every model measured on the same windows of one dataset.
    Models that share a tokenizer and chat template share the windows (equal perplexity_on.sha256);
    models with another cut the same text into other tokens, so their rows compare with each
    other only."""

    model_config = CONTRACT

    job_id: str
    job_type: Literal["evaluate"]
    rows: list[Evaluated]
    evaluated_tokens: Count  # forward tokens over all models: what the job is billed for
    wall_time_s: float
    training_tokens: Literal[0] = 0  # an evaluation trains nothing


Metrics = Annotated[Union[TrainMetrics, ContractMetrics, EvaluateMetrics], Field(discriminator="job_type")]
METRICS = TypeAdapter(Metrics)


def problems(error: ValidationError, limit: int = 5) -> str:
    """A validation error in one line, field by field (for a failure reason a person reads)."""
    found = error.errors(include_url=False)
    text = "; ".join(f"{'.'.join(str(part) for part in e['loc']) or 'document'}: {e['msg']}" for e in found[:limit])
    return text + (f"; and {len(found) - limit} more" if len(found) > limit else "")
