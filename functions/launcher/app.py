"""Launcher: one SageMaker training job per queued job, from the launch queue (SQS).

Each message is {"job_id"}; shared.launching decides what to do with it. A message it defers
(RetryLater) is reported as a partial batch failure, so SQS delivers it again; its receive count
is the attempt, up to FUSION_MAX_LAUNCH_ATTEMPTS.
"""

from __future__ import annotations

import json
import os
from functools import cache
from typing import Any

from aws_lambda_powertools import Logger, Tracer
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord

from shared.contracts import PRECISION_ENV
from shared.events import Bus
from shared.launching import launch as launch_job, max_launch_attempts
from shared import snapstart
from shared.store import Jobs
from shared.telemetry import metrics
from shared.training_jobs import STACK_ENV, LaunchConfig

logger = Logger()
tracer = Tracer()
# Every message is judged alone: a batch where all failed still reports them one by one.
processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)


@cache
def _clients() -> tuple[Jobs, Any, Bus]:
    session = snapstart.session()
    return Jobs(session=session), session.client("sagemaker"), Bus(session=session)


def _s3() -> Any:
    return _s3_at(os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))


@cache
def _s3_at(endpoint: str | None) -> Any:
    """One client per endpoint: the local stack moves AWS to another endpoint within a process."""
    return snapstart.session().client("s3")


def _launch_config() -> LaunchConfig:
    return LaunchConfig(
        artifacts_bucket=os.environ["ARTIFACTS_BUCKET"],
        training_image_uri=os.environ["TRAINING_IMAGE_URI"],
        role_arn=os.environ["SAGEMAKER_ROLE_ARN"],
        use_spot=os.environ.get("FUSION_USE_SPOT", "false").lower() == "true",
        stack=os.environ.get(STACK_ENV, ""),
        precision=os.environ.get(PRECISION_ENV) or "auto",
    )


# SnapStart: clients built before the snapshot, and anew after each restore.
snapstart.prepare_before_snapshot(lambda: (_clients()[0].client, _clients()[2].client, _s3()))
snapstart.renew_after_restore(_clients.cache_clear, _s3_at.cache_clear)


def launch(job_id: str, attempt: int) -> str:
    """Start the training job of `job_id` once; returns what happened (for logs and tests)."""
    jobs, sagemaker, bus = _clients()
    return launch_job(job_id, attempt, jobs=jobs, sagemaker=sagemaker, bus=bus, s3=_s3(), config=_launch_config(),
                      max_attempts=max_launch_attempts())


def record_handler(record: SQSRecord) -> str:
    job_id = json.loads(record.body)["job_id"]
    logger.append_keys(job_id=job_id)
    try:
        return launch(job_id, int(record.attributes.approximate_receive_count or 1))
    finally:
        logger.remove_keys(["job_id"])  # the next message of the batch is another job's


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    return process_partial_response(event=event, record_handler=record_handler, processor=processor, context=context)
