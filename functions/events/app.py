"""Events: follow SageMaker training jobs to their end, register models, bill, and tell the bus.

Triggered by the EventBridge rule on "SageMaker Training Job State Change" for jobs named
fusion-*. Duplicates and late events change nothing (forward-only conditional writes).
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

from aws_lambda_powertools import Logger

from shared.events import Bus
from shared.jobs import record_state_change
from shared.store import Catalog, Jobs

logger = Logger()


@cache
def _clients() -> tuple[Jobs, Catalog, Any, Bus]:
    import boto3

    session = boto3.session.Session()
    return Jobs(session=session), Catalog(session=session), session.client("s3"), Bus(session=session)


@logger.inject_lambda_context
def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    jobs, catalog, s3, bus = _clients()
    detail = event.get("detail", {})
    outcome = record_state_change(
        detail, jobs=jobs, catalog=catalog, s3=s3, artifacts_bucket=os.environ["ARTIFACTS_BUCKET"]
    )
    if outcome.job is None:
        logger.info("no change", extra={"training_job": detail.get("TrainingJobName"),
                                        "sagemaker_status": detail.get("TrainingJobStatus")})
        return {"changed": False}
    bus.job_state_changed(outcome.job)
    if outcome.model is not None:
        bus.model_registered(outcome.model)
    logger.info("job moved", extra={"job_id": outcome.job["job_id"], "status": outcome.job["status"]})
    return {"changed": True, "job_id": outcome.job["job_id"], "status": outcome.job["status"]}
