"""What the HTTP API answers: one pydantic model per response body.

The API's routes return these (so /openapi.json documents each success body and a response that
strays from its model is a fault of ours, never sent), and the CLI reads its answers with the
same models. Money is a decimal string in JSON (an estimate's components keep their sub-cent
value; totals and bills are in cents).

Readers tolerate fields they do not know (extra="ignore"), so a client built on these models keeps
working against an API that has since added fields.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field

from shared.contracts import EvalRecord, Evaluated, HeldOut, Progress, StepRecord
from shared.pricing import Estimate
from shared.shapes import ModelConfig
from shared.lifecycle import STATUS_RANK

JobStatus = Literal[tuple(STATUS_RANK)]
JobType = Literal["train", "contract", "evaluate", "tuning"]
DatasetStatus = Literal["pending", "ready", "rejected", "failed", "replaced", "deleted"]
ModelKind = Literal["base", "trained", "contracted", "imported"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _schedule(job_type: str, settings: dict[str, Any]) -> str | None:
    """What a job's settings run, in words (shared.settings); None for settings no model reads."""
    from shared.settings import SETTINGS_BY_TYPE

    try:
        return SETTINGS_BY_TYPE[job_type].model_validate(settings, strict=False).schedule()
    except (KeyError, ValueError):
        return None


# --- errors ------------------------------------------------------------------------------------


class ErrorDetail(_Body):
    field: str = Field(description="The request field at fault (dotted for nested ones), or the header.")
    message: str


class ErrorBody(_Body):
    code: str = Field(description="Stable, machine-readable: budget_exceeded, job_not_found, invalid_request, ...")
    message: str = Field(description="One sentence for a person.")
    details: list[ErrorDetail]


class ErrorResponse(_Body):
    """Every refusal and fault: 4xx and 5xx alike."""

    error: ErrorBody


# --- jobs --------------------------------------------------------------------------------------


class EvaluationTable(_Body):
    """An evaluate job's result: each model on the same windows of one dataset at one seq_len."""

    evaluated_tokens: int = Field(description="Forward tokens over all models: what the job was billed for.")
    rows: list[Evaluated] = Field(description="One row per model, in the order asked. Rows whose perplexity_on "
                                  "has the same sha256 were measured on the very same tokens and compare directly.")


class Stopped(_Body):
    step: int
    total_steps: int


class Job(_Body):
    """A job as its owner sees it."""

    job_id: str
    type: JobType
    status: JobStatus
    owner: str
    model: str | None = Field(description="The base model trained, or the model contracted (none for an evaluation).")
    models: list[str] | None = Field(default=None, description="An evaluation's models, in order.")
    dataset: str | None = Field(description="The dataset id or S3 URI it trains, calibrates or measures on.")
    validation_dataset: str | None = Field(
        default=None, description="The validation set its held-out metrics are measured on; none: a split of dataset.")
    settings: dict[str, Any] = Field(description="The job's settings with every default filled in.")
    estimate: Estimate
    warnings: list[str]
    training_job_name: str | None
    output_model_id: str | None
    failure_reason: str | None
    progress: Progress | None = Field(
        default=None, description="While it runs: the trainer's latest progress (turn, cycle, step, loss, eta).")
    bill: Decimal | None = Field(description="Once ended: what it cost (never more than the estimate's total).")
    evaluation: EvaluationTable | None = Field(default=None, description="A completed evaluation's table.")
    stopped: Stopped | None = Field(default=None, description="A cancelled job: the step it had reached when it "
                                                              "stopped (none when it had not reported one).")
    created_at: str
    updated_at: str

    @computed_field(description="What the settings run, in words: turns, cycles and steps (or the pruning and "
                                "healing of a contraction).")
    @property
    def schedule(self) -> str | None:
        return _schedule(self.type, self.settings)


class JobList(_Body):
    jobs: list[Job]


class QuotedEstimate(Estimate):
    allowed_to_proceed: bool
    remaining_budget: Decimal


class Budget(_Body):
    limit: Decimal
    spent: Decimal = Field(description="Bills of ended jobs plus the estimates of jobs not yet ended.")
    remaining: Decimal


class Quote(_Body):
    """A priced job not created: what it would run, cost and take, and whether the budget lets it."""

    type: JobType
    model: str | None
    dataset: str | None
    settings: dict[str, Any]
    estimate: QuotedEstimate
    warnings: list[str]
    allowed_to_proceed: bool
    budget: Budget

    @computed_field(description="What the settings run, in words: turns, cycles and steps (or the pruning and "
                                "healing of a contraction).")
    @property
    def schedule(self) -> str | None:
        return _schedule(self.type, self.settings)


class Curve(_Body):
    """A job's training curve: loss per logged step (thinned) and every held-out evaluation."""

    job_id: str
    status: JobStatus
    steps: list[StepRecord] = Field(description="The metrics log's step records, oldest first.")
    evals: list[EvalRecord] = Field(description="The metrics log's held-out evaluations, oldest first.")
    logged_steps: int = Field(description="Steps logged in all (steps holds at most max_points of them).")


# --- models ------------------------------------------------------------------------------------


class CatalogModel(_Body):
    """A catalog entry: a public base model, a model a job made, or a folder the caller registered."""

    model_id: str
    name: str | None
    owner: str
    kind: ModelKind
    status: Literal["ready", "rejected", "deleted"] = Field(
        default="ready", description="A registered folder that failed its check is rejected; a model its owner "
                                     "deleted stays as deleted, for its children's lineage; all others are ready.")
    deleted_at: str | None = None
    reason: str | None = None
    available: bool = Field(
        default=True, description="Whether its weights exist: a base model size whose weights this deployment "
                                  "has not published is listed, but not available, and a job on it is refused (422).")
    parent_id: str | None = None
    job_id: str | None = None
    parameters: int | None = None
    depth: int | None = None
    family: str | None = None
    context_length: int | None = None
    dtype: str | None = None
    perplexity: float | None = Field(default=None, description="Held-out perplexity, on perplexity_on.")
    perplexity_on: HeldOut | None = Field(
        default=None, description="The dataset, windows, seq_len and tokens scored of perplexity, and the windows' "
        "digest: two perplexities compare only when their digests agree (absent for models made before it was "
        "recorded, and for base and registered models, which no job measured).")
    parent_perplexity: float | None = Field(
        default=None, description="A contracted model's parent, measured by the contract job on the same windows "
        "(perplexity_on).")
    artifact_uri: str | None = None
    cost: Decimal | None = None
    config: ModelConfig | None = None
    dataset: str | None = None
    tuning_id: str | None = Field(default=None, description="The tuning whose trial this model's job promoted.")
    created_at: str


class ModelList(_Body):
    models: list[CatalogModel]


class UploadURL(_Body):
    name: str = Field(description="The file's path in the folder.")
    url: str = Field(description="A presigned PUT of the file's bytes.")


class ModelUpload(_Body):
    """Where a model folder of the caller's goes, and a presigned PUT for each of its files."""

    uri: str = Field(description="The folder (s3://...): POST /models registers it once the files are in.")
    files: list[UploadURL]
    expires_in: int = Field(description="Seconds the URLs stay valid.")


class DownloadFile(_Body):
    path: str = Field(description="The file's path in the model folder (hf/config.json, ...).")
    url: str = Field(description="A presigned GET of the file.")
    size: int = Field(description="Bytes.")


class Download(_Body):
    """How to fetch a model: its files, each with a presigned GET and its path in the model folder
    (a model a job made), or one presigned GET of its archive, model.tar.gz (a published base
    model, or a model made before outputs were uploaded uncompressed)."""

    model_id: str
    files: list[DownloadFile] = Field(default_factory=list, description=(
        "The model folder's files: write each at its path to have the folder. Empty for an archive."))
    url: str | None = Field(default=None, description="A presigned GET of the model's archive, model.tar.gz; "
                                                       "null when the model is its files.")
    expires_in: int = Field(description="Seconds the URLs stay valid.")
    export_dir: str = Field(description="The folder (of the files, or in the archive) holding the transformers export.")


class Message(_Body):
    role: Literal["system", "user", "assistant"]
    content: str


class Generation(_Body):
    """A model's answer to POST /models/{id}/generate."""

    model_id: str
    text: str = Field(description="What the model wrote (after the prompt, or as the assistant's turn).")
    messages: list[Message] | None = Field(default=None, description="For a conversation: it, with the answer as "
                                                                     "the last turn.")
    endpoint: str = Field(description="The endpoint that answered (locally: the model itself, on this machine).")
    latency_ms: int = Field(description="How long the endpoint took to answer, in milliseconds.")


# --- datasets ----------------------------------------------------------------------------------


class ChatFigures(_Body):
    """What the check counted in a dataset of conversations (rendered with the default chat template)."""

    examples: int = Field(description="Conversations.")
    assistant_tokens: int = Field(description="Tokens of the assistant's turns: those the loss is on.")
    assistant_share: float = Field(description="The assistant's tokens as a share of all tokens.")
    lengths: dict[str, int] = Field(description="Conversations by length in tokens (one over the longest seq_len "
                                                "counts every longer one).")


class Dataset(_Body):
    """A dataset as the API shows it."""

    dataset_id: str
    name: str
    status: DatasetStatus
    reason: str | None = None
    s3_uri: str
    bytes: int | None = None
    tokens: int | None = None
    chat: ChatFigures | None = Field(default=None, description="For conversations: what the check counted.")
    created_at: str
    deleted_at: str | None = None


class RegisteredDataset(Dataset):
    upload_url: str = Field(description="A presigned PUT of the dataset's bytes; the check runs once they land.")


class DatasetList(_Body):
    datasets: list[Dataset]


# --- tunings -----------------------------------------------------------------------------------


class FullRun(_Body):
    """What the full run with a trial's settings would cost and take (a dry-run POST /jobs's figures)."""

    total: Decimal
    eta_seconds: int
    settings: dict[str, Any]


class Trial(_Body):
    """One trial of a tuning: a short proxy of the full run with these settings."""

    name: str = Field(description="The trial's SageMaker training job.")
    rank: int = Field(description="1 is the best: completed trials by held-out perplexity, then stopped, then failed.")
    status: Literal["completed", "stopped", "failed", "running"]
    early_stopped: bool = Field(description="The tuner stopped it early: it was doing worse than earlier trials.")
    settings: dict[str, Any] = Field(description="The values the tuner chose for the searched settings.")
    perplexity: float | None = Field(description="Held-out perplexity, the objective (the last the trial logged).")
    curve: list[float] | None = Field(description="Held-out perplexity at each cycle's end (completed trials).")
    tokens_trained: int
    cost: Decimal = Field(description="What its tokens cost (unrounded: the tuning's bill rounds their sum once).")
    full_run: FullRun | None


class Tuning(_Body):
    """A tuning as its owner sees it: priced before it ran, its trials ranked once it has ended."""

    tuning_id: str
    status: JobStatus
    owner: str
    model: str
    dataset: str
    settings: dict[str, Any] = Field(description="The settings every trial shares.")
    ranges: dict[str, dict[str, float]] = Field(description="The searched settings, each {min, max}.")
    max_trials: int
    max_parallel_trials: int
    proxy_fraction: float
    strategy: str
    objective: str
    estimate: Estimate = Field(description="The price: max_trials of the dearest trial the ranges allow.")
    bill: Decimal | None = Field(description="Once ended: what its trials' tokens cost (never more than the estimate).")
    failure_reason: str | None
    trials: list[Trial]
    best_trial: str | None
    created_at: str
    updated_at: str


class TuningList(_Body):
    tunings: list[Tuning]


class TuningQuote(Quote):
    """A priced tuning not created."""

    tuning: dict[str, Any] = Field(description="Ranges, trials, parallelism, proxy fraction, strategy, objective.")
