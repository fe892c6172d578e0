"""Cancelling a job, whatever state it is in: at once before launch, else by stopping its training job."""

from __future__ import annotations

from typing import Any

from shared.errors import JobError, not_found
from shared.lifecycle import JOB_ID_PATTERN, NO_CHARGE, STOPPABLE_STATUSES, is_tuning
from shared.store import ConditionFailed, Jobs
from shared.telemetry import job_ended
from shared.training_jobs import stop_training_job, training_job_name


def cancel(job_id: str, owner: str, *, jobs: Jobs, sagemaker: Any) -> dict[str, Any]:
    """Cancel a job of `owner`: a queued job ends at once (nothing ran, nothing billed); a launching
    or running one becomes cancelling and its training job is asked to stop (the Stopped event
    then ends it cancelled, billed for the tokens it trained). Repeating it is harmless."""
    job = jobs.get(job_id, owner) if JOB_ID_PATTERN.fullmatch(job_id) else None
    if job is None:
        raise not_found("job", "job_id", job_id)
    if job["status"] == "queued":
        try:
            cancelled = jobs.annotate(job_id, ("queued",), status="cancelled", bill=NO_CHARGE,
                                      failure_reason="cancelled before launch")
        except ConditionFailed:
            job = jobs.get(job_id, owner)  # the launcher took it meanwhile: stop it instead
        else:
            job_ended(cancelled)
            return cancelled
    if job["status"] in STOPPABLE_STATUSES:
        try:
            job = jobs.annotate(job_id, STOPPABLE_STATUSES, status="cancelling")
        except ConditionFailed:
            job = jobs.get(job_id, owner)
    if job["status"] == "cancelling":
        if is_tuning(job_id):
            from shared.tunings import stop_tuning_job

            stop_tuning_job(sagemaker, training_job_name(job_id))
        else:
            stop_training_job(sagemaker, training_job_name(job_id))
        return job
    if job["status"] == "cancelled":
        return job
    raise JobError(409, "job_ended", f"job {job_id!r} has already {job['status']}: there is nothing to cancel",
                   [{"field": "job_id", "message": f"the job is {job['status']}"}])
