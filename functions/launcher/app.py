"""Launcher: one SageMaker training job per queued job, from the launch queue (SQS).

Each message is {"job_id"}. The training job name is derived from the job id, so a repeated
message finds the job it already started instead of starting a second one. Throttling and
quota errors put the message back (partial batch failure) until FUSION_MAX_LAUNCH_ATTEMPTS,
then mark the job failed; permanent errors mark it failed at once. No path drops a job silently.
A job cancelled before launch is never launched; one cancelled while its training job was being
created has that training job stopped. A job on a dataset whose object changed since its check
is refused (failed, nothing billed), never launched on unchecked data.
"""

from __future__ import annotations

import json
import os
from functools import cache
from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord

from shared.events import Bus, announce
from shared.launching import dataset_replaced
from shared.lifecycle import NO_CHARGE
from shared.store import ConditionFailed, Jobs
from shared.training_jobs import (
    LaunchConfig,
    stop_training_job,
    training_job_exists,
    training_job_name,
    training_job_request,
)

logger = Logger()
# Every message is judged alone: a batch where all failed still reports them one by one.
processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)

# Errors that say "not now" rather than "never": the message is retried.
RETRYABLE = {
    "ThrottlingException", "Throttling", "ThrottledException", "RequestLimitExceeded", "TooManyRequestsException",
    "ResourceLimitExceeded", "CapacityError", "InsufficientCapacityError", "ServiceUnavailable",
    "ServiceUnavailableException", "InternalFailure", "InternalServerError", "InternalError",
}


class RetryLater(Exception):
    """The launch hit a transient limit; SQS redelivers the message after its visibility timeout."""


@cache
def _clients() -> tuple[Jobs, Any, Bus]:
    import boto3

    session = boto3.session.Session()
    return Jobs(session=session), session.client("sagemaker"), Bus(session=session)


def _s3() -> Any:
    return _s3_at(os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))


@cache
def _s3_at(endpoint: str | None) -> Any:
    """One client per endpoint: the local stack moves AWS to another endpoint within a process."""
    import boto3

    return boto3.session.Session().client("s3")


def _launch_config() -> LaunchConfig:
    return LaunchConfig(
        artifacts_bucket=os.environ["ARTIFACTS_BUCKET"],
        training_image_uri=os.environ["TRAINING_IMAGE_URI"],
        role_arn=os.environ["SAGEMAKER_ROLE_ARN"],
        use_spot=os.environ.get("FUSION_USE_SPOT", "false").lower() == "true",
    )


def launch(job_id: str, attempt: int) -> str:
    """Start the training job of `job_id` once; returns what happened (for logs and tests)."""
    jobs, sagemaker, bus = _clients()
    job = jobs.get(job_id)
    if job is None:
        logger.warning("no such job: message dropped", extra={"job_id": job_id})
        return "unknown"
    name = training_job_name(job_id)
    if job["status"] == "cancelling":
        return _cancel_unlaunched(jobs, sagemaker, bus, job)
    if job["status"] not in ("queued", "launching"):
        announce(job, jobs=jobs, bus=bus)  # a retry after a publish that failed
        return "already-" + job["status"]
    if job["status"] == "queued":
        try:
            job = jobs.transition(job_id, "launching", training_job_name=name)
        except ConditionFailed:
            return launch(job_id, attempt)  # moved on meanwhile: decide again on what it is now
    announce(job, jobs=jobs, bus=bus)
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        replaced = dataset_replaced(_s3(), job)
    except (ClientError, BotoCoreError) as exc:
        return _retry_or_fail(jobs, bus, job_id, attempt, f"could not check the dataset: {exc}")
    if replaced:
        _fail(jobs, bus, job_id, replaced)
        return "failed"
    try:
        sagemaker.create_training_job(**training_job_request(job, _launch_config()))
    except ClientError as exc:
        code, message = exc.response["Error"].get("Code", ""), exc.response["Error"].get("Message", "")
        if code == "ResourceInUse" and training_job_exists(sagemaker, name):
            return "existing"
        if code in RETRYABLE:
            return _retry_or_fail(jobs, bus, job_id, attempt, f"{code}: {message}")
        _fail(jobs, bus, job_id, f"SageMaker refused the training job: {code}: {message}")
        return "failed"
    except BotoCoreError as exc:  # no answer at all (network, endpoint): as transient as throttling
        return _retry_or_fail(jobs, bus, job_id, attempt, str(exc))
    logger.info("training job started", extra={"job_id": job_id, "training_job_name": name})
    if jobs.get(job_id)["status"] == "cancelling":  # cancelled while it was being created: stop it now
        stop_training_job(sagemaker, name)
        return "stopped"
    return "started"


def _cancel_unlaunched(jobs: Jobs, sagemaker: Any, bus: Bus, job: dict[str, Any]) -> str:
    """A job cancelled while launching: end it if its training job was never created, else stop it."""
    name = training_job_name(job["job_id"])
    if training_job_exists(sagemaker, name):
        stop_training_job(sagemaker, name)
        return "stopped"
    try:
        job = jobs.annotate(job["job_id"], ("cancelling",), status="cancelled", bill=NO_CHARGE,
                            failure_reason="cancelled before launch")
    except ConditionFailed:
        return "already-moved"
    announce(job, jobs=jobs, bus=bus)
    return "cancelled"


def _retry_or_fail(jobs: Jobs, bus: Bus, job_id: str, attempt: int, reason: str) -> str:
    attempts = int(os.environ.get("FUSION_MAX_LAUNCH_ATTEMPTS", "5"))
    if attempt >= attempts:
        _fail(jobs, bus, job_id, f"could not launch after {attempt} attempts: {reason}")
        return "failed"
    logger.warning("launch deferred", extra={"job_id": job_id, "attempt": attempt, "reason": reason})
    raise RetryLater(reason)


def _fail(jobs: Jobs, bus: Bus, job_id: str, reason: str) -> None:
    try:
        job = jobs.transition(job_id, "failed", failure_reason=reason, bill=NO_CHARGE)
    except ConditionFailed:
        return
    logger.error("launch failed", extra={"job_id": job_id, "reason": reason})
    announce(job, jobs=jobs, bus=bus)


def record_handler(record: SQSRecord) -> str:
    job_id = json.loads(record.body)["job_id"]
    return launch(job_id, int(record.attributes.approximate_receive_count or 1))


@logger.inject_lambda_context
def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    return process_partial_response(event=event, record_handler=record_handler, processor=processor, context=context)
