"""Following a job's training job to its end: each SageMaker state change (an event, or what the
reconciler reads with DescribeTrainingJob) moves the job forward once, registers its model and bills it.
"""

from __future__ import annotations

import json

from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from aws_lambda_powertools import Logger

from shared.contracts import EvaluateMetrics, HeldOut, Metrics
from shared.events import announce
from shared.lifecycle import END_STATUSES, NO_CHARGE, UNLAUNCHED_STATUSES, is_tuning
from shared.outputs import keep_metrics_log, model_prefix, model_uri, read_metrics, read_progress
from shared.pricing import Estimate, bill
from shared.store import Catalog, ConditionFailed, Jobs, json_column, missing_object, now
from shared.telemetry import job_ended
from shared.training_jobs import NO_SUCH_TRAINING_JOB, job_id_of, training_job_name

logger = Logger(child=True)


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


def catalog_entry(job: dict[str, Any], metrics: Metrics, artifact_uri: str, cost: Decimal) -> dict[str, Any]:
    config = metrics.config
    contracted = job["type"] == "contract"
    return {
        "model_id": model_id_for(job["job_id"]),
        "name": job["settings"]["output_name"],
        "owner": job["owner"],
        "kind": "contracted" if contracted else "trained",
        "parent_id": job["model"],
        "job_id": job["job_id"],
        "parameters": config.parameters(),
        "depth": config.n_layers,
        "family": config.family,
        "context_length": config.context_length,
        "perplexity": metrics.final_perplexity,
        "perplexity_on": perplexity_on(job, metrics.heldout),
        # A contracted model's parent, measured by the same job on the same windows: the pair compares.
        "parent_perplexity": metrics.perplexity_before if metrics.job_type == "contract" else None,
        "artifact_uri": artifact_uri,
        "cost": str(cost),
        "config": config.model_dump(mode="json"),
        "dataset": job.get("dataset"),
        "tuning_id": job.get("tuning_id"),  # lineage of a promoted trial (shared.tunings)
        "created_at": now(),
    }


def perplexity_on(job: dict[str, Any], heldout: HeldOut | None) -> dict[str, Any] | None:
    """What a job measured on (its metrics' HeldOut), naming the dataset: the job's validation set,
    or the dataset it trained on, calibrated on or evaluated."""
    if heldout is None:
        return None
    dataset = job.get("validation_dataset") if heldout.source == "validation" else job.get("dataset")
    return heldout.model_copy(update={"dataset": dataset}).model_dump(mode="json")


def evaluation_table(job: dict[str, Any], metrics: EvaluateMetrics) -> dict[str, Any]:
    """An evaluate job's result as the job shows it: a row per model, each naming its windows."""
    rows = [{**row.model_dump(mode="json"), "perplexity_on": perplexity_on(job, row.perplexity_on)}
            for row in metrics.rows]
    return {"evaluated_tokens": metrics.evaluated_tokens, "rows": rows}


@dataclass
class Outcome:
    """What one state-change event did: the job after it (None when it changed nothing) and the job as it is now."""

    job: dict[str, Any] | None = None
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
        artifact_uri = model_prefix(given) if isinstance(given, str) and given.startswith(own) else (
            model_uri(f"{own}output/", training_job_name(job_id))
        )
        unreadable = _unreadable_metrics()
        try:
            metrics = read_metrics(s3, artifact_uri)
            if metrics.job_type != job["type"]:
                raise ValueError(f"metrics.json is a {metrics.job_type} job's, this job is a {job['type']} job")
            if isinstance(metrics, EvaluateMetrics):  # no model: the table goes on the job
                cost = bill(estimate, 0, metrics.evaluated_tokens)
            else:
                cost = bill(estimate, metrics.training_tokens)
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
            if model is None:
                fields = {"evaluation": json_column(evaluation_table(job, metrics)), "bill": str(cost),
                          "artifact_uri": artifact_uri}
            else:
                catalog.register(model)  # once: a second register of the same id is a no-op
                fields = {"output_model_id": model["model_id"], "bill": str(cost), "artifact_uri": artifact_uri}
    elif status == "cancelled":
        progress = read_progress(s3, artifacts_bucket, job_id)  # none readable: no token proven trained
        fields = {"bill": str(bill(estimate, progress.tokens_trained if progress else 0))}
        if progress:  # where it stopped, kept with the job (the progress file expires with its checkpoints)
            fields["stopped"] = json_column({"step": progress.step, "total_steps": progress.total_steps})
    elif status == "failed":
        reason, secondary = detail.get("FailureReason"), detail.get("SecondaryStatus")
        if not isinstance(reason, str) or not reason:
            reason = f"SageMaker reported the job {secondary if isinstance(secondary, str) and secondary else 'failed'}"
        fields = {"failure_reason": reason, "bill": NO_CHARGE}
    if status in END_STATUSES:  # before the job ends: a failed copy is retried with the event
        keep_metrics_log(s3, artifacts_bucket, job_id)
    try:
        job = jobs.transition(job_id, status, **fields)
    except ConditionFailed:
        return Outcome(current=jobs.get(job_id))
    if status in END_STATUSES:
        job_ended(job)
    return Outcome(job=job, current=job)


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


# The longest a launch message lives before SQS dead-letters it: the launch queue's maxReceiveCount
# (21) times its VisibilityTimeout (360 s) in template.yaml (a test ties them), and an hour more.
# A job still queued or launching this long after its last change, with no training job, has no
# message left to launch it: it would hold its estimate against its tenant's budget forever.
UNLAUNCHED_AFTER_SECONDS = 21 * 360 + 3600


def unlaunched_for(job: dict[str, Any], at: datetime) -> float:
    """Seconds since the job last changed (created, or moved to launching)."""
    since = datetime.fromisoformat(str(job.get("updated_at") or job["created_at"]).replace("Z", "+00:00"))
    return (at - since).total_seconds()


def fail_unlaunched(job_id: str, *, jobs: Jobs, bus: Any, at: datetime) -> dict[str, Any] | None:
    """End a job that stayed queued or launching past UNLAUNCHED_AFTER_SECONDS without a training
    job: failed, billed 0.00 (its estimate released), the reason named. None if it moved meanwhile."""
    job = jobs.get(job_id)
    if job is None or job["status"] not in UNLAUNCHED_STATUSES or unlaunched_for(job, at) < UNLAUNCHED_AFTER_SECONDS:
        return None
    hours = unlaunched_for(job, at) / 3600
    reason = (f"never launched: still {job['status']} without a SageMaker training job {hours:.1f} h after its last "
              f"change (its launch message was dead-lettered or lost); nothing was billed")
    try:
        job = jobs.transition(job_id, "failed", only_from=(job["status"],), failure_reason=reason, bill=NO_CHARGE)
    except ConditionFailed:
        return None  # launched, cancelled or ended meanwhile
    logger.warning("unlaunched job failed", extra={"job_id": job_id, "reason": reason})
    job_ended(job)
    announce(job, jobs=jobs, bus=bus)
    return job


def not_in_sagemaker(job: dict[str, Any], summary: dict[str, Any], *, jobs: Jobs, bus: Any, at: datetime) -> None:
    """A reconciler pass's answer to a job (or tuning) SageMaker has no record of: failed when it
    has been launching too long (fail_unlaunched), else counted as not created yet."""
    if job["status"] == "launching" and fail_unlaunched(job["job_id"], jobs=jobs, bus=bus, at=at):
        summary["unlaunched"].append(job["job_id"])
    else:
        summary["not_created"] += 1  # still launching: the launch queue holds its message


def reconcile_in_flight(*, jobs: Jobs, catalog: Catalog, s3: Any, sagemaker: Any, bus: Any,
                        artifacts_bucket: str, at: datetime | None = None) -> dict[str, Any]:
    """One pass of the reconciler over the jobs in flight: each compared with DescribeTrainingJob and,
    where SageMaker says more than the job knows, followed as the event that state stands for; a
    job queued or launching for too long without a training job is failed (fail_unlaunched).
    Returns how many were checked, moved, not yet created and unreadable, and those failed."""
    from botocore.exceptions import BotoCoreError, ClientError

    at = at or datetime.now(timezone.utc)
    summary = {"checked": 0, "moved": [], "not_created": 0, "errors": 0, "unlaunched": []}
    for job in jobs.in_flight(("queued",)):  # never launched: no training job to describe
        summary["checked"] += 1
        if fail_unlaunched(job["job_id"], jobs=jobs, bus=bus, at=at) is not None:
            summary["unlaunched"].append(job["job_id"])
    for job in jobs.in_flight():
        if is_tuning(job["job_id"]):
            continue  # the tuner's own state: shared.tunings.reconcile_tunings
        summary["checked"] += 1
        name = training_job_name(job["job_id"])
        try:
            description = sagemaker.describe_training_job(TrainingJobName=name)
            detail = state_change_of(description)
            if SAGEMAKER_STATUS.get(detail.get("TrainingJobStatus", "")) == job["status"]:
                continue  # SageMaker and the job agree: nothing was missed
            outcome = follow(detail, jobs=jobs, catalog=catalog, s3=s3, bus=bus, artifacts_bucket=artifacts_bucket)
        except ClientError as exc:
            if exc.response["Error"].get("Code") in NO_SUCH_TRAINING_JOB:
                not_in_sagemaker(job, summary, jobs=jobs, bus=bus, at=at)
                continue
            summary["errors"] += 1
            logger.warning("job not reconciled", extra={"job_id": job["job_id"]}, exc_info=True)
            continue
        except BotoCoreError:  # unreachable for now: the next run tries again
            summary["errors"] += 1
            logger.warning("job not reconciled", extra={"job_id": job["job_id"]}, exc_info=True)
            continue
        if outcome.job is not None:
            logger.warning("missed state change applied", extra={"job_id": job["job_id"],
                                                                 "status": outcome.job["status"]})
            summary["moved"].append(job["job_id"])
    return summary
