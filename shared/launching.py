"""Launching a queued job: one SageMaker training job per job, however often its message comes.

The training job's name is derived from the job id, so a repeated message finds the training job
it already started instead of starting a second one. Throttling, quota and unreachable-service
errors are worth another attempt (RetryLater) until the last one, which fails the job; any other
refusal fails it at once. No path drops a job silently. A job cancelled before launch is never
launched; one cancelled while its training job was being created has that training job stopped.
A job on a dataset whose object changed since its check is refused (failed, nothing billed),
never launched on unchecked data.
"""

from __future__ import annotations

import os
from typing import Any

from aws_lambda_powertools import Logger

from shared.events import announce
from shared.lifecycle import NO_CHARGE, UNLAUNCHED_STATUSES, is_tuning
from shared.datasets import dataset_replaced
from shared.store import ConditionFailed, Jobs
from shared.telemetry import job_ended, job_launched, launch_retried
from shared.training_jobs import (
    LaunchConfig,
    stop_training_job,
    training_job_exists,
    training_job_name,
    training_job_request,
)

logger = Logger(child=True)

# Deliveries of a job's launch message before it is failed; the template's MaxLaunchAttempts sets it.
MAX_LAUNCH_ATTEMPTS_ENV = "FUSION_MAX_LAUNCH_ATTEMPTS"
DEFAULT_MAX_LAUNCH_ATTEMPTS = 5


def max_launch_attempts() -> int:
    return int(os.environ.get(MAX_LAUNCH_ATTEMPTS_ENV) or DEFAULT_MAX_LAUNCH_ATTEMPTS)

# Errors that say "not now" rather than "never": the message is retried.
RETRYABLE = {
    "ThrottlingException", "Throttling", "ThrottledException", "RequestLimitExceeded", "TooManyRequestsException",
    "ResourceLimitExceeded", "CapacityError", "InsufficientCapacityError", "ServiceUnavailable",
    "ServiceUnavailableException", "InternalFailure", "InternalServerError", "InternalError",
}


class RetryLater(Exception):
    """The launch hit a transient limit; the queue delivers the message again later."""


def launch(job_id: str, attempt: int, *, jobs: Jobs, sagemaker: Any, bus: Any, s3: Any, config: LaunchConfig,
           max_attempts: int) -> str:
    """Start the training job of `job_id` once, on its `attempt`-th delivery; returns what
    happened (for logs and tests), or raises RetryLater to have the message delivered again."""
    name = training_job_name(job_id)
    while True:
        job = jobs.get(job_id)
        if job is None:
            logger.warning("no such job: message dropped", extra={"job_id": job_id})
            return "unknown"
        if job["status"] == "cancelling":
            return _cancel_unlaunched(job, jobs=jobs, sagemaker=sagemaker, bus=bus)
        if job["status"] not in UNLAUNCHED_STATUSES:
            announce(job, jobs=jobs, bus=bus)  # a retry after a publish that failed
            return "already-" + job["status"]
        if job["status"] == "launching":
            break
        try:
            job = jobs.transition(job_id, "launching", training_job_name=name)
            break
        except ConditionFailed:
            continue  # moved on meanwhile: decide again on what it is now
    announce(job, jobs=jobs, bus=bus)
    from botocore.exceptions import BotoCoreError, ClientError

    def retry_or_fail(reason: str) -> str:
        if attempt >= max_attempts:
            _fail(job_id, f"could not launch after {attempt} attempts: {reason}", jobs=jobs, bus=bus)
            return "failed"
        logger.warning("launch deferred", extra={"job_id": job_id, "attempt": attempt, "reason": reason})
        launch_retried()
        raise RetryLater(reason)

    try:
        replaced = dataset_replaced(s3, job)
    except (ClientError, BotoCoreError) as exc:
        return retry_or_fail(f"could not check the dataset: {exc}")
    if replaced:
        _fail(job_id, replaced, jobs=jobs, bus=bus)
        return "failed"
    exists, stop = _sagemaker_job(job_id)
    try:
        if is_tuning(job_id):
            from shared.tunings import tuning_job_request

            sagemaker.create_hyper_parameter_tuning_job(**tuning_job_request(job, config))
        else:
            sagemaker.create_training_job(**training_job_request(job, config))
    except ClientError as exc:
        code, message = exc.response["Error"].get("Code", ""), exc.response["Error"].get("Message", "")
        if code == "ResourceInUse" and exists(sagemaker, name):
            return "existing"
        if code in RETRYABLE:
            return retry_or_fail(f"{code}: {message}")
        _fail(job_id, f"SageMaker refused the training job: {code}: {message}", jobs=jobs, bus=bus)
        return "failed"
    except BotoCoreError as exc:  # no answer at all (network, endpoint): as transient as throttling
        return retry_or_fail(str(exc))
    logger.info("training job started", extra={"job_id": job_id, "training_job_name": name})
    job_launched()
    if jobs.get(job_id)["status"] == "cancelling":  # cancelled while it was being created: stop it now
        stop(sagemaker, name)
        return "stopped"
    return "started"


def _sagemaker_job(job_id: str) -> tuple[Any, Any]:
    """(exists, stop) of the SageMaker job a job runs as: a tuning's tuning job, else a training job."""
    if is_tuning(job_id):
        from shared.tunings import stop_tuning_job, tuning_job_exists

        return tuning_job_exists, stop_tuning_job
    return training_job_exists, stop_training_job


def _cancel_unlaunched(job: dict[str, Any], *, jobs: Jobs, sagemaker: Any, bus: Any) -> str:
    """A job cancelled while launching: end it if its training job was never created, else stop it."""
    name = training_job_name(job["job_id"])
    exists, stop = _sagemaker_job(job["job_id"])
    if exists(sagemaker, name):
        stop(sagemaker, name)
        return "stopped"
    try:
        job = jobs.annotate(job["job_id"], ("cancelling",), status="cancelled", bill=NO_CHARGE,
                            failure_reason="cancelled before launch")
    except ConditionFailed:
        return "already-moved"
    job_ended(job)
    announce(job, jobs=jobs, bus=bus)
    return "cancelled"


def _fail(job_id: str, reason: str, *, jobs: Jobs, bus: Any) -> None:
    try:
        job = jobs.transition(job_id, "failed", failure_reason=reason, bill=NO_CHARGE)
    except ConditionFailed:
        return
    logger.error("launch failed", extra={"job_id": job_id, "reason": reason})
    job_ended(job)
    announce(job, jobs=jobs, bus=bus)
