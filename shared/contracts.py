"""The files the training container and the functions exchange, each typed once (docs/architecture.md §7).

- `Hyperparameters`: what the launcher puts in CreateTrainingJob's HyperParameters and the
  container reads back from hyperparameters.json (every value a string in transit).
- `Progress`: checkpoints/progress.json, the trainer's latest point, rewritten as it trains.
- `LogRecord`: one line of checkpoints/metrics.jsonl, the trainer's curve, appended as it trains.
- `Metrics`: metrics.json, the outcome of a finished job (in model/ and in output.tar.gz).

The container writes each through its model and the functions read each through the same one,
so a field the writer drops or retypes fails the reader's validation, by name, instead of
surfacing as a KeyError or a wrong bill. No torch here: the functions import this module too.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from shared.memory import Layout
from shared.settings import (
    SETTINGS_BY_TYPE,
    ContractSettings,
    EvaluateSettings,
    TrainSettings,
    from_hyperparameters,
    to_hyperparameters,
)
from shared.shapes import ModelConfig

JobType = Literal["train", "contract", "evaluate"]
# Written by one side and read by the other: nothing unknown, nothing coerced (a JSON true is no count).
CONTRACT = ConfigDict(extra="forbid", strict=True, frozen=True)
Count = Annotated[int, Field(ge=0)]


class Hyperparameters(BaseModel):
    """A job as the container receives it: its type, its id, its settings and how to lay it out."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_type: JobType
    job_id: str
    settings: TrainSettings | ContractSettings | EvaluateSettings
    layout: Layout = Layout()

    @model_validator(mode="after")
    def _settings_of_the_type(self) -> "Hyperparameters":
        expected = SETTINGS_BY_TYPE[self.job_type]
        if not isinstance(self.settings, expected):
            raise ValueError(f"a {self.job_type} job takes {expected.__name__}")
        return self

    def strings(self) -> dict[str, str]:
        """SageMaker's HyperParameters map: the settings' and the layout's keys side by side."""
        return {**to_hyperparameters(self.job_type, self.job_id, self.settings), **self.layout.hyperparameters()}

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> "Hyperparameters":
        """hyperparameters.json back into the job (a job launched before layouts has the default one)."""
        layout, rest = Layout.split(raw)
        job_type, job_id, settings = from_hyperparameters(rest)
        return cls(job_type=job_type, job_id=job_id, settings=settings, layout=layout)


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


class Windows(BaseModel):
    """The token windows a perplexity was measured on. Two perplexities compare only when their
    windows agree: the same dataset, tokenizer and seq_len give the same windows and the same digest."""

    model_config = CONTRACT

    split: Literal["heldout", "all"]  # the dataset's held-out windows, or a sample of all its windows
    windows: Count
    seq_len: Count
    sha256: str  # of the windows' token ids, in order


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
    heldout: Windows | None = None  # where final_perplexity was measured (None: a job from before it was said)


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
    windows: Windows
    target_tokens: Count  # the tokens scored: every predicted token, or only the assistant's on chat data
    loss: float  # mean cross-entropy over target_tokens (nats)
    perplexity: float  # exp(loss)
    # Chat data: the loss on the assistant's tokens only (targets of the other roles are ignored); else None.
    assistant_loss: float | None = None


class EvaluateMetrics(BaseModel):
    """metrics.json of an evaluate job: every model measured on the same windows of one dataset.
    Models that share a tokenizer share the windows (equal windows.sha256); models with another
    tokenizer cut the same text into other tokens, so their rows compare with each other only."""

    model_config = CONTRACT

    job_id: str
    job_type: Literal["evaluate"]
    seq_len: Count
    split: Literal["heldout", "all"]
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
