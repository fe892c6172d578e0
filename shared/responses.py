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

from pydantic import BaseModel, ConfigDict, Field

from shared.contracts import EvalRecord, Evaluated, Progress, StepRecord
from shared.pricing import Estimate
from shared.shapes import ModelConfig
from shared.lifecycle import STATUS_RANK

JobStatus = Literal[tuple(STATUS_RANK)]
JobType = Literal["train", "contract", "evaluate"]
DatasetStatus = Literal["pending", "ready", "rejected"]
ModelKind = Literal["base", "trained", "contracted", "imported"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


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

    dataset: str | None
    split: Literal["heldout", "all"]
    seq_len: int
    evaluated_tokens: int = Field(description="Forward tokens over all models: what the job was billed for.")
    rows: list[Evaluated] = Field(description="One row per model, in the order asked. Rows with the same "
                                  "windows.sha256 were measured on the very same tokens and compare directly.")


class Job(_Body):
    """A job as its owner sees it."""

    job_id: str
    type: JobType
    status: JobStatus
    owner: str
    model: str | None = Field(description="The base model trained, or the model contracted (none for an evaluation).")
    models: list[str] | None = Field(default=None, description="An evaluation's models, in order.")
    dataset: str | None = Field(description="The dataset id or S3 URI it trains or calibrates on.")
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
    created_at: str
    updated_at: str


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


class Curve(_Body):
    """A job's training curve: loss per logged step (thinned) and every held-out evaluation."""

    job_id: str
    status: JobStatus
    steps: list[StepRecord] = Field(description="The metrics log's step records, oldest first.")
    evals: list[EvalRecord] = Field(description="The metrics log's held-out evaluations, oldest first.")
    logged_steps: int = Field(description="Steps logged in all (steps holds at most max_points of them).")


# --- models ------------------------------------------------------------------------------------


class MeasuredOn(_Body):
    """The windows a perplexity was measured on; two perplexities compare only on the same ones."""

    dataset: str | None = Field(description="The dataset id or S3 URI the windows come from.")
    split: Literal["heldout", "all"] = Field(
        description="heldout: the dataset's held-out windows (a seeded 5% at this seq_len, the ones a train job "
        "at this seq_len never trains on); all: a seeded sample of all its windows.")
    windows: int = Field(description="How many windows.")
    seq_len: int = Field(description="Tokens predicted per window (each window holds seq_len + 1 tokens).")
    sha256: str = Field(description="Digest of the windows' token ids: equal digests, the very same tokens.")

    def short(self) -> str:
        """In a table cell: `<split> <windows>x<seq_len> <dataset>`."""
        return f"{self.split} {self.windows}x{self.seq_len} {self.dataset or '-'}"

    def describe(self) -> str:
        """In a sentence: which windows, of which dataset, at which seq_len."""
        which = "held-out windows" if self.split == "heldout" else "windows sampled from all"
        return f"{self.windows} {which} of {self.seq_len} tokens of {self.dataset or '-'} (sha256 {self.sha256[:12]})"


class CatalogModel(_Body):
    """A catalog entry: a public base model, a model a job made, or a folder the caller registered."""

    model_id: str
    name: str | None
    owner: str
    kind: ModelKind
    status: Literal["ready", "rejected"] = Field(
        default="ready", description="A registered folder that failed its check is rejected; all others are ready.")
    reason: str | None = None
    parent_id: str | None = None
    job_id: str | None = None
    parameters: int | None = None
    depth: int | None = None
    family: str | None = None
    context_length: int | None = None
    dtype: str | None = None
    perplexity: float | None = Field(default=None, description="Held-out perplexity, on perplexity_measured_on.")
    perplexity_measured_on: MeasuredOn | None = Field(
        default=None, description="The dataset, windows and seq_len of perplexity (absent for models made before "
        "it was recorded, and for base and registered models, which no job measured).")
    parent_perplexity: float | None = Field(
        default=None, description="A contracted model's parent, measured by the contract job on the same windows.")
    artifact_uri: str | None = None
    cost: Decimal | None = None
    config: ModelConfig | None = None
    dataset: str | None = None
    created_at: str


class ModelList(_Body):
    models: list[CatalogModel]


class Download(_Body):
    model_id: str
    url: str = Field(description="A presigned GET of the model's archive, model.tar.gz.")
    expires_in: int = Field(description="Seconds the URL stays valid.")
    export_dir: str = Field(description="The archive's folder holding the transformers export.")


# --- datasets ----------------------------------------------------------------------------------


class Dataset(_Body):
    """A dataset as the API shows it."""

    dataset_id: str
    name: str
    status: DatasetStatus
    reason: str | None = None
    s3_uri: str
    bytes: int | None = None
    tokens: int | None = None
    created_at: str


class RegisteredDataset(Dataset):
    upload_url: str = Field(description="A presigned PUT of the dataset's bytes; the check runs once they land.")


class DatasetList(_Body):
    datasets: list[Dataset]
