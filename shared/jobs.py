"""The job domain: resolve and price a request, build its SageMaker launch, and follow it to the end.

Nothing here creates an AWS client: the stores (shared.store) and clients come in as arguments.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from shared.memory import DoesNotFit
from shared.pricing import Estimate, bill, estimate_contract, estimate_train
from shared.settings import (
    SETTINGS_BY_TYPE,
    ContractJobRequest,
    ContractSettings,
    TrainJobRequest,
    TrainSettings,
    default_output_name,
    to_hyperparameters,
)
from shared.shapes import ModelConfig
from shared.tenancy import encode_tenant
from shared.store import (
    ACTIVE_STATUSES,
    END_STATUSES,
    Catalog,
    ConditionFailed,
    Datasets,
    Jobs,
    OverBudget,
    Tenants,
    cents,
    missing_object,
    now,
)

JOB_ID_PATTERN = re.compile(r"[a-z0-9-]{1,40}")
TRAINING_JOB_PREFIX = "fusion-"
METRIC_NAMES = ("step", "turn", "cycle", "train_loss", "heldout_loss", "heldout_perplexity", "tokens_per_second")
METRICS_MAX_POINTS = 1000  # training-loss points a job's metrics answer holds at most
MAX_RUNTIME_LIMIT = 28 * 24 * 3600  # SageMaker's ceiling on MaxRuntimeInSeconds
NO_CHARGE = "0.00"
# The spend limit of a tenant without a record of their own in the tenants table.
DEFAULT_BUDGET_ENV = "FUSION_DEFAULT_BUDGET_USD"
DEFAULT_BUDGET_USD = "100.00"

# The fields of a job that the HTTP API shows (the stored record carries a few more for launching).
PUBLIC_JOB_FIELDS = (
    "job_id", "type", "status", "owner", "model", "dataset", "settings", "estimate", "warnings",
    "training_job_name", "output_model_id", "failure_reason", "progress", "bill", "created_at", "updated_at",
)


@dataclass
class JobError(Exception):
    """A request the service refuses, with the HTTP status and the fields at fault."""

    status: int
    code: str
    message: str
    details: list[dict[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def not_found(what: str, field_name: str, value: str) -> JobError:
    return JobError(404, f"{what}_not_found", f"{what} {value!r} was not found",
                    [{"field": field_name, "message": f"no {what} {value!r} in your catalog"}])


def invalid(field_name: str, message: str) -> JobError:
    return JobError(422, "invalid_request", message, [{"field": field_name, "message": message}])


def new_job_id() -> str:
    return os.urandom(10).hex()


def training_job_name(job_id: str) -> str:
    return TRAINING_JOB_PREFIX + job_id


def job_id_of(training_job: str) -> str | None:
    if not training_job.startswith(TRAINING_JOB_PREFIX):
        return None
    job_id = training_job[len(TRAINING_JOB_PREFIX):]
    return job_id if JOB_ID_PATTERN.fullmatch(job_id) else None


# Tags pydantic puts in an error location for the branch of a discriminated union.
_UNION_TAGS = {"train", "contract", "request"}


def describe_error(error: dict[str, Any]) -> dict[str, str]:
    """One pydantic (or Powertools request) validation error as {"field", "message"} in words."""
    loc = [str(p) for p in error.get("loc", ())]
    kind = error.get("type", "")
    if loc and loc[0] in ("body", "query", "path"):
        source, loc = loc[0], loc[1:]
    else:
        source = "body"
    if kind == "json_invalid":
        return {"field": "body", "message": f"malformed JSON: {error.get('ctx', {}).get('error', 'cannot parse')}"}
    loc = [p for p in loc if p not in _UNION_TAGS]
    field = ".".join(loc) or source
    if kind == "extra_forbidden":
        message = f"'{loc[-1] if loc else field}' is not a known field"
    elif kind == "missing":
        message = "is required"
    elif kind == "union_tag_invalid" or kind == "union_tag_not_found":
        field, message = "type", "type must be 'train' or 'contract'"
    else:
        message = error.get("msg", "is invalid")
    return {"field": field, "message": message}


# --- resolve and price -------------------------------------------------------------------------


def resolve(
    request: TrainJobRequest | ContractJobRequest,
    owner: str,
    *,
    catalog: Catalog,
    datasets: Datasets,
    data_bucket: str,
    job_id: str | None = None,
) -> dict[str, Any]:
    """Check a request against the catalog and price it: the job record, not yet stored.

    Raises JobError for anything the caller got wrong; nothing is written.
    """
    job_id = job_id or new_job_id()
    if isinstance(request, TrainJobRequest):
        base = catalog.get(request.model, owner)
        if base is None:
            raise not_found("model", "model", request.model)
        if base.get("status", "ready") != "ready":  # a registered folder that failed its check
            raise invalid("model", f"{request.model} is {base['status']}: {base.get('reason')}")
        config = ModelConfig.model_validate(base["config"])
        settings: TrainSettings | ContractSettings = request.hyperparams
        if settings.seq_len > config.context_length:
            raise invalid(
                "hyperparams.seq_len",
                f"seq_len={settings.seq_len} exceeds the context length {config.context_length} of {request.model}",
            )
        model_id, dataset = request.model, request.dataset
        estimate = _planned(lambda: estimate_train(settings, config), "model")
    else:
        settings = request.hyperparams
        source = catalog.get(settings.source_model_id, owner)
        if source is None:
            raise not_found("model", "hyperparams.source_model_id", settings.source_model_id)
        if source["owner"] != owner:  # a public base model: untrained here, and not the caller's to shrink
            raise invalid(
                "hyperparams.source_model_id",
                f"{settings.source_model_id} is a base model; contract a model you trained from it",
            )
        if settings.num_layers_to_contract > source["depth"]:
            raise invalid(
                "hyperparams.num_layers_to_contract",
                f"num_layers_to_contract={settings.num_layers_to_contract} exceeds the depth "
                f"{source['depth']} of {settings.source_model_id}",
            )
        dataset = request.dataset or source.get("dataset")
        if not dataset:
            raise invalid("dataset", f"{settings.source_model_id} records no dataset: give one for calibration")
        model_id, base = settings.source_model_id, source
        estimate = _planned(lambda: estimate_contract(settings, ModelConfig.model_validate(source["config"])),
                            "hyperparams.source_model_id")
    dataset_uri, pinned = resolve_dataset(dataset, owner, datasets=datasets, data_bucket=data_bucket)
    if settings.output_name is None:
        settings = settings.model_copy(update={"output_name": default_output_name(job_id)})
    created = now()
    return {
        "job_id": job_id,
        "type": request.type,
        "status": "queued",
        "owner": owner,
        "model": model_id,
        "dataset": dataset,
        "settings": settings.model_dump(mode="json"),
        "estimate": estimate.model_dump(mode="json"),
        "warnings": settings.warnings(),
        "training_job_name": None,
        "output_model_id": None,
        "failure_reason": None,
        "progress": None,
        "bill": None,
        "created_at": created,
        "updated_at": created,
        "dataset_uri": dataset_uri,
        "dataset_pin": pinned,
        "input_model_uri": base["artifact_uri"],
    }


def _planned(estimate: Any, field_name: str) -> Estimate:
    """The estimate, or a 422 naming the model when no instance the service runs on can hold it."""
    try:
        return estimate()
    except DoesNotFit as error:
        message = f"no instance this service trains on can hold this job: {error}"
        raise JobError(422, "does_not_fit", message, [{"field": field_name, "message": message}]) from None


def resolve_dataset(dataset: str, owner: str, *, datasets: Datasets, data_bucket: str) -> tuple[str, dict | None]:
    """The S3 URI to train on, and the object its check admitted ({"etag", "version_id"}) when
    it is a dataset id: a ready dataset id of the caller, or a URI under their data prefix."""
    if dataset.startswith("s3://"):
        prefix = f"s3://{data_bucket}/{encode_tenant(owner)}/"
        rest = dataset[len(prefix):]
        if not dataset.startswith(prefix) or not rest or ".." in rest.split("/"):
            raise invalid("dataset", f"an S3 dataset must lie under {prefix}")
        return dataset, None
    record = datasets.get(dataset, owner)
    if record is None:
        raise not_found("dataset", "dataset", dataset)
    if record.get("status") != "ready":
        raise invalid("dataset", f"dataset {dataset!r} is {record.get('status')}, not ready")
    pin = {"etag": record["s3_etag"], "version_id": record.get("s3_version_id")} if record.get("s3_etag") else None
    return record["s3_uri"], pin


def dataset_replaced(s3: Any, job: dict[str, Any]) -> str | None:
    """Why the job's dataset is no longer the object its check admitted, or None when it still is
    (or the job trains on an S3 URI, which no check pinned). A job never trains on bytes nobody
    checked: the launcher refuses it instead."""
    pin = job.get("dataset_pin")
    if not pin:
        return None
    from botocore.exceptions import ClientError

    bucket, key = split_s3(job["dataset_uri"])
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if missing_object(exc):
            return f"dataset {job['dataset']!r} was deleted after its check"
        raise
    if head.get("ETag") != pin["etag"] or (pin.get("version_id") and head.get("VersionId") != pin["version_id"]):
        return (f"dataset {job['dataset']!r} was replaced after its check (a second upload); a job trains only "
                "on the data that was checked: register the dataset again and upload it once")
    return None


def submit(job: dict[str, Any], *, jobs: Jobs, sqs: Any, queue_url: str, limit_cents: int | None = None) -> dict[str, Any]:
    """Store a resolved job "queued" and put it on the launch queue.

    If the queue refuses it, the job is marked failed with the reason (never left queued with
    nothing to launch it) and a 503 JobError is raised.
    """
    jobs.create(job, limit_cents=limit_cents)
    try:
        sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps({"job_id": job["job_id"]}))
    except Exception as exc:  # whatever the cause, the job must not sit queued forever unseen
        failed = jobs.transition(job["job_id"], "failed", failure_reason=f"could not queue the job for launch: {exc}",
                                 bill=NO_CHARGE)
        raise JobError(503, "launch_queue_unavailable",
                       "the job could not be queued for launch and was marked failed; retry later",
                       [{"field": "job_id", "message": failed["job_id"]}]) from exc
    return job


def public(job: dict[str, Any]) -> dict[str, Any]:
    return {k: job.get(k) for k in PUBLIC_JOB_FIELDS}


def settings_of(job: dict[str, Any]) -> TrainSettings | ContractSettings:
    return SETTINGS_BY_TYPE[job["type"]].model_validate(job["settings"])


# --- budgets -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """A tenant's spend limit and what is already spent against it.

    Spent = the bills of ended jobs + the estimated totals of jobs not yet ended (queued, launching,
    running, cancelling): an estimate is committed the moment a job is accepted, and replaced by
    its bill (never more than the estimate) when the job ends. The tenants table keeps it as a
    counter (shared.store.Jobs moves it in the same transactions as the jobs), so reading it costs
    one item, however many jobs the tenant has.
    """

    limit: Decimal
    spent: Decimal

    @property
    def remaining(self) -> Decimal:
        return max(self.limit - self.spent, Decimal("0.00"))

    def allows(self, total: Decimal) -> bool:
        return total <= self.limit - self.spent

    def summary(self) -> dict[str, str]:
        return {"limit": str(self.limit), "spent": str(self.spent), "remaining": str(self.remaining)}


def default_budget() -> Decimal:
    return Decimal(os.environ.get(DEFAULT_BUDGET_ENV) or DEFAULT_BUDGET_USD)


def budget_of(owner: str, *, tenants: Tenants) -> Budget:
    """The tenant's limit (their record's budget_usd, else the default) and their committed spend."""
    record = tenants.get(owner) or {}
    limit = Decimal(record["budget_usd"]) if record.get("budget_usd") else default_budget()
    spent = Decimal(int(record.get("spent_cents", 0))) / 100
    return Budget(limit=limit, spent=spent.quantize(Decimal("0.01")))


def quote(job: dict[str, Any], budget: Budget) -> dict[str, Any]:
    """The estimate answer: the priced job and whether the tenant's budget lets it run."""
    allowed = budget.allows(Decimal(job["estimate"]["total"]))
    estimate = {**job["estimate"], "allowed_to_proceed": allowed, "remaining_budget": str(budget.remaining)}
    return {"type": job["type"], "model": job["model"], "dataset": job["dataset"], "settings": job["settings"],
            "estimate": estimate, "warnings": job["warnings"], "allowed_to_proceed": allowed,
            "budget": budget.summary()}


def check_budget(job: dict[str, Any], budget: Budget) -> None:
    """Refuse a job whose estimate would take its tenant past their spend limit (nothing is written)."""
    total = Decimal(job["estimate"]["total"])
    if not budget.allows(total):
        message = (f"this job is estimated at USD {total} but only USD {budget.remaining} of your budget of "
                   f"USD {budget.limit} remains (USD {budget.spent} spent or committed)")
        raise JobError(402, "budget_exceeded", message, [{"field": "estimate.total", "message": message}])


def admit(job: dict[str, Any], *, jobs: Jobs, tenants: Tenants, sqs: Any, queue_url: str) -> dict[str, Any]:
    """Check the budget, then store (committing the estimate) and queue a resolved job: the one way
    a job is accepted. The check here words the refusal; the conditional write in Jobs.create
    enforces it against concurrent requests."""
    budget = budget_of(job["owner"], tenants=tenants)
    check_budget(job, budget)
    try:
        return submit(job, jobs=jobs, sqs=sqs, queue_url=queue_url, limit_cents=cents(budget.limit))
    except OverBudget:
        check_budget(job, budget_of(job["owner"], tenants=tenants))  # words it with the spend as it is now
        raise JobError(402, "budget_exceeded", "another job took the rest of your budget meanwhile",
                       [{"field": "estimate.total", "message": "over budget"}]) from None


# --- cancel ------------------------------------------------------------------------------------


def cancel(job_id: str, owner: str, *, jobs: Jobs, sagemaker: Any) -> dict[str, Any]:
    """Cancel a job of `owner`: a queued job ends at once (nothing ran, nothing billed); a launching
    or running one becomes cancelling and its training job is asked to stop (the Stopped event
    then ends it cancelled, billed for the tokens it trained). Repeating it is harmless."""
    job = jobs.get(job_id, owner) if JOB_ID_PATTERN.fullmatch(job_id) else None
    if job is None:
        raise not_found("job", "job_id", job_id)
    if job["status"] == "queued":
        try:
            return jobs.annotate(job_id, ("queued",), status="cancelled", bill=NO_CHARGE,
                                 failure_reason="cancelled before launch")
        except ConditionFailed:
            job = jobs.get(job_id, owner)  # the launcher took it meanwhile: stop it instead
    if job["status"] in ("launching", "running"):
        try:
            job = jobs.annotate(job_id, ("launching", "running"), status="cancelling")
        except ConditionFailed:
            job = jobs.get(job_id, owner)
    if job["status"] == "cancelling":
        stop_training_job(sagemaker, training_job_name(job_id))
        return job
    if job["status"] == "cancelled":
        return job
    raise JobError(409, "job_ended", f"job {job_id!r} has already {job['status']}: there is nothing to cancel",
                   [{"field": "job_id", "message": f"the job is {job['status']}"}])


# What SageMaker answers about a training job it has no such job for (or none in a state to act on).
NO_SUCH_TRAINING_JOB = ("ResourceNotFound", "ValidationException")


def _training_job_call(call: Any, name: str) -> bool:
    """Make one SageMaker call on a training job; False when SageMaker has no such job."""
    from botocore.exceptions import ClientError

    try:
        call(TrainingJobName=name)
    except ClientError as exc:
        if exc.response["Error"].get("Code") in NO_SUCH_TRAINING_JOB:
            return False
        raise
    return True


def training_job_exists(sagemaker: Any, name: str) -> bool:
    return _training_job_call(sagemaker.describe_training_job, name)


def stop_training_job(sagemaker: Any, name: str) -> bool:
    """Ask SageMaker to stop a training job; False when there is none running to stop (not yet
    created, or already ended: its own end event settles the job)."""
    return _training_job_call(sagemaker.stop_training_job, name)


# --- domain events, at least once --------------------------------------------------------------


def announce(job: dict[str, Any], *, jobs: Jobs, bus: Any, catalog: Catalog | None = None) -> dict[str, Any]:
    """Publish the job's current state (and, once completed, its model) unless already published.

    The state write comes first and this second: if publishing fails, the job's published_status
    still trails its status, so whatever retries (the event, the message, the request) publishes
    again. Subscribers may see an event twice, never miss one; the state itself changes once.
    """
    status = job["status"]
    if job.get("published_status") == status:
        return job
    bus.job_state_changed(job)
    if status == "completed" and job.get("output_model_id") and catalog is not None:
        model = catalog.get(job["output_model_id"], job["owner"])
        if model is not None:
            bus.model_registered(model)
    try:
        return jobs.annotate(job["job_id"], (status,), published_status=status)
    except ConditionFailed:
        return job  # it moved on: whoever moved it announces the newer state


# --- launch ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchConfig:
    artifacts_bucket: str
    training_image_uri: str
    role_arn: str
    use_spot: bool = False
    volume_size_gb: int = 50


def training_job_request(job: dict[str, Any], config: LaunchConfig) -> dict[str, Any]:
    """The CreateTrainingJob parameters of a stored job (boto3 shapes)."""
    job_id = job["job_id"]
    estimate = Estimate.model_validate(job["estimate"])
    prefix = f"s3://{config.artifacts_bucket}/jobs/{job_id}"
    max_runtime = min(estimate.max_runtime_seconds, MAX_RUNTIME_LIMIT)
    stopping: dict[str, int] = {"MaxRuntimeInSeconds": max_runtime}
    spot = config.use_spot or estimate.spot  # the stack's switch puts every tier on spot
    if spot:  # waiting for spot capacity gets as long again as the run itself
        stopping["MaxWaitTimeInSeconds"] = min(2 * max_runtime, MAX_RUNTIME_LIMIT)
    return {
        "TrainingJobName": training_job_name(job_id),
        "HyperParameters": {**to_hyperparameters(job["type"], job_id, settings_of(job)),
                            **estimate.layout().hyperparameters()},
        "AlgorithmSpecification": {
            "TrainingImage": config.training_image_uri,
            "TrainingInputMode": "File",
            "MetricDefinitions": [{"Name": n, "Regex": f"{n}=([0-9.eE+-]+)"} for n in METRIC_NAMES],
            "EnableSageMakerMetricsTimeSeries": True,
        },
        "RoleArn": config.role_arn,
        "InputDataConfig": [
            _channel("training", job["dataset_uri"]),
            _channel("model", job["input_model_uri"]),
        ],
        "OutputDataConfig": {"S3OutputPath": f"{prefix}/output/"},
        "CheckpointConfig": {"S3Uri": f"{prefix}/checkpoints/", "LocalPath": "/opt/ml/checkpoints"},
        "ResourceConfig": {
            "InstanceType": estimate.instance_type,
            "InstanceCount": estimate.instance_count,
            "VolumeSizeInGB": config.volume_size_gb,
        },
        "StoppingCondition": stopping,
        "EnableManagedSpotTraining": spot,
        "Tags": [{"Key": "fusion:job-id", "Value": job_id}, {"Key": "fusion:owner", "Value": encode_tenant(job["owner"])}],
    }


def _channel(name: str, uri: str) -> dict[str, Any]:
    return {
        "ChannelName": name,
        "DataSource": {
            "S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": uri, "S3DataDistributionType": "FullyReplicated"}
        },
    }


# --- follow SageMaker to the end ---------------------------------------------------------------


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def progress_key(job_id: str) -> str:
    return f"jobs/{job_id}/checkpoints/progress.json"




def read_progress(s3: Any, bucket: str, job_id: str) -> dict[str, Any] | None:
    """progress.json of a job, or None when there is none to read: not written yet, or not a
    JSON object (a torn or foreign write is no progress, not an error)."""
    from botocore.exceptions import ClientError

    try:
        body = s3.get_object(Bucket=bucket, Key=progress_key(job_id))["Body"].read()
    except ClientError as exc:
        if missing_object(exc):
            return None
        raise
    try:
        progress = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return progress if isinstance(progress, dict) else None


def count_of(value: Any) -> int:
    """A token count from a file the container wrote: a non-negative int, else 0 (nothing proven)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def metrics_log_key(job_id: str) -> str:
    """The trainer's metrics log (training_image.train.METRICS_LOG), synced beside progress.json."""
    return f"jobs/{job_id}/checkpoints/metrics.jsonl"


def read_metrics_log(s3: Any, bucket: str, job_id: str, *, max_points: int = METRICS_MAX_POINTS) -> dict[str, Any]:
    """A job's curve: training loss per logged step (at most max_points, evenly thinned, the last
    step always kept) and every held-out evaluation. Empty lists before the trainer logs anything.

    A resumed trainer logs the steps after its checkpoint again: the last line of a (kind, step) wins.
    """
    try:
        body = s3.get_object(Bucket=bucket, Key=metrics_log_key(job_id))["Body"].read()
    except Exception as exc:
        if not missing_object(exc):
            raise
        body = b""
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    for line in body.decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
            key = (str(record["kind"]), int(record["step"]))
        except (ValueError, KeyError, TypeError):  # a line cut by a sync in mid-write
            continue
        latest[key] = record
    ordered = [latest[key] for key in sorted(latest, key=lambda k: k[1])]
    steps = [r for r in ordered if r["kind"] == "step"]
    evals = [r for r in ordered if r["kind"] == "eval"]
    stride = -(-len(steps) // max_points) if steps else 1
    thinned = steps[::stride]
    if steps and thinned[-1] is not steps[-1]:
        thinned.append(steps[-1])
    return {"job_id": job_id, "steps": thinned, "evals": evals, "logged_steps": len(steps)}


def read_metrics(s3: Any, model_artifacts_uri: str) -> dict[str, Any]:
    """metrics.json from the small output.tar.gz SageMaker writes beside model.tar.gz."""
    import io
    import tarfile

    bucket, key = split_s3(model_artifacts_uri)
    key = key.rsplit("/", 1)[0] + "/output.tar.gz"
    blob = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as archive:
        for member in archive.getmembers():
            if member.isfile() and member.name.rsplit("/", 1)[-1] == "metrics.json":
                return json.load(archive.extractfile(member))
    raise FileNotFoundError(f"no metrics.json in s3://{bucket}/{key}")


# SageMaker's TrainingJobStatus -> Fusion status.
SAGEMAKER_STATUS = {
    "InProgress": "running",
    "Stopping": "cancelling",
    "Completed": "completed",
    "Failed": "failed",
    "Stopped": "cancelled",
}


# SecondaryStatus of a job SageMaker stopped at the MaxRuntime / MaxWaitTime the launcher set.
LIMIT_STOPS = ("MaxRuntimeExceeded", "MaxWaitTimeExceeded")


def model_id_for(job_id: str) -> str:
    """The catalog id of a job's output: derived from the job, so registering twice is detectable."""
    return f"m-{job_id}"


def catalog_entry(job: dict[str, Any], metrics: dict[str, Any], artifact_uri: str, cost: Decimal) -> dict[str, Any]:
    config = ModelConfig.model_validate(metrics["config"])
    return {
        "model_id": model_id_for(job["job_id"]),
        "name": job["settings"]["output_name"],
        "owner": job["owner"],
        "kind": "trained" if job["type"] == "train" else "contracted",
        "parent_id": job["model"],
        "job_id": job["job_id"],
        "parameters": config.parameters(),
        "depth": config.n_layers,
        "family": config.family,
        "context_length": config.context_length,
        "perplexity": metrics.get("final_perplexity"),
        "artifact_uri": artifact_uri,
        "cost": str(cost),
        "config": config.model_dump(mode="json"),
        "dataset": job.get("dataset"),
        "created_at": now(),
    }


@dataclass
class Outcome:
    """What one state-change event did: the job after it, and the model it registered, if any."""

    job: dict[str, Any] | None = None
    model: dict[str, Any] | None = None
    current: dict[str, Any] | None = None  # the job as it is now, changed or not (to announce it)


def _definitive(exc: Exception) -> bool:
    """Whether reading the metrics failed for good (no such object, not an archive, bad content)
    rather than for now (throttling, network): only the latter is worth the event's retries."""
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        return missing_object(exc) or exc.response["Error"].get("Code") == "NoSuchBucket"
    return True


def _unreadable_metrics() -> tuple[type[Exception], ...]:
    import tarfile

    from botocore.exceptions import ClientError
    from pydantic import ValidationError

    return (ClientError, FileNotFoundError, tarfile.TarError, EOFError, OSError, ValueError, KeyError, TypeError,
            RecursionError, ValidationError)


def record_state_change(
    detail: dict[str, Any], *, jobs: Jobs, catalog: Catalog, s3: Any, artifacts_bucket: str
) -> Outcome:
    """Apply one "SageMaker Training Job State Change" to the job and the catalog.

    Forward-only conditional writes make duplicates and late arrivals no-ops, so any order of
    the same events ends in the same state with the same bill. Returns an empty Outcome when
    the event changed nothing.
    """
    name, sagemaker_status = detail.get("TrainingJobName"), detail.get("TrainingJobStatus")
    if not isinstance(name, str) or not isinstance(sagemaker_status, str):
        return Outcome()  # not an event of ours to act on (nor one anyone can act on)
    job_id = job_id_of(name)
    status = SAGEMAKER_STATUS.get(sagemaker_status)
    if status == "cancelled" and detail.get("SecondaryStatus") in LIMIT_STOPS:
        status = "failed"  # SageMaker stopped it at our own runtime limit: no one cancelled it
    job = jobs.get(job_id) if job_id and status else None
    if job is None:
        return Outcome()
    if job["status"] in END_STATUSES:
        return Outcome(current=job)
    estimate = Estimate.model_validate(job["estimate"])
    fields: dict[str, Any] = {}
    model = None
    if status == "completed":
        artifacts = detail.get("ModelArtifacts")
        given = artifacts.get("S3ModelArtifacts") if isinstance(artifacts, dict) else None
        # Read only where the launch told SageMaker to write: an artifact named anywhere else (another
        # bucket, another job's prefix) is not this job's, and its metrics are not to be trusted.
        own = f"s3://{artifacts_bucket}/jobs/{job_id}/"
        artifact_uri = given if isinstance(given, str) and given.startswith(own) else (
            f"{own}output/{training_job_name(job_id)}/output/model.tar.gz"
        )
        unreadable = _unreadable_metrics()
        try:
            metrics = read_metrics(s3, artifact_uri)
            if not isinstance(metrics, dict):
                raise ValueError("metrics.json is not a JSON object")
            trained = metrics.get("training_tokens", estimate.training_tokens)
            if not isinstance(trained, int) or isinstance(trained, bool):
                raise ValueError(f"training_tokens is {trained!r}, not a count")
            cost = bill(estimate, trained)
            model = catalog_entry(job, metrics, artifact_uri, cost)
        except unreadable as exc:
            if not _definitive(exc):
                raise  # throttled or unreachable: the event is retried
            status, model = "failed", None
            fields = {"failure_reason": f"SageMaker reported the job completed, but its metrics.json could not be "
                                        f"read ({type(exc).__name__}: {exc}); no model was registered; the "
                                        f"artifact is kept at {artifact_uri}",
                      "bill": NO_CHARGE, "artifact_uri": artifact_uri}
        else:
            catalog.register(model)  # once: a second register of the same id is a no-op
            fields = {"output_model_id": model["model_id"], "bill": str(cost), "artifact_uri": artifact_uri}
    elif status == "cancelled":
        progress = read_progress(s3, artifacts_bucket, job_id) or {}
        fields = {"bill": str(bill(estimate, count_of(progress.get("tokens_trained"))))}
    elif status == "failed":
        reason, secondary = detail.get("FailureReason"), detail.get("SecondaryStatus")
        if not isinstance(reason, str) or not reason:
            reason = f"SageMaker reported the job {secondary if isinstance(secondary, str) and secondary else 'failed'}"
        fields = {"failure_reason": reason, "bill": NO_CHARGE}
    try:
        job = jobs.transition(job_id, status, **fields)
    except ConditionFailed:
        return Outcome(current=jobs.get(job_id))
    return Outcome(job=job, model=model, current=job)


def follow(detail: dict[str, Any], *, jobs: Jobs, catalog: Catalog, s3: Any, bus: Any, artifacts_bucket: str) -> Outcome:
    """A state change, from its event or from the reconciler: recorded, then announced (also when
    an earlier delivery changed the job but could not publish it)."""
    outcome = record_state_change(detail, jobs=jobs, catalog=catalog, s3=s3, artifacts_bucket=artifacts_bucket)
    if outcome.current is not None:
        announce(outcome.current, jobs=jobs, bus=bus, catalog=catalog)
    return outcome


# The fields of DescribeTrainingJob that a "SageMaker Training Job State Change" event carries
# in its detail, under the same names: a description reads as the event of the job's state now.
STATE_CHANGE_FIELDS = ("TrainingJobName", "TrainingJobArn", "TrainingJobStatus", "SecondaryStatus", "FailureReason",
                       "ModelArtifacts")


def state_change_of(description: dict[str, Any]) -> dict[str, Any]:
    """The state-change event detail that a DescribeTrainingJob answer stands for."""
    return {k: description[k] for k in STATE_CHANGE_FIELDS if description.get(k) is not None}


def is_active(job: dict[str, Any]) -> bool:
    return job["status"] in ACTIVE_STATUSES
