"""Reconciler: on a schedule, settle the jobs whose SageMaker state change never arrived.

EventBridge invokes the events function asynchronously: an event whose handling keeps failing
is dropped after Lambda's retries (to the on-failure destination), and then nothing would move
its job again: a job left running forever, unbilled, its model unregistered. Every run compares
each job in flight with DescribeTrainingJob and hands what SageMaker says now to
shared.state_changes.follow, the events function's own path, as the event it stands for; the
forward-only writes make it a no-op for a job whose events did arrive, so the job, model and
bill are those the events make.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

from aws_lambda_powertools import Logger

from shared.events import Bus
from shared.state_changes import SAGEMAKER_STATUS, follow, state_change_of
from shared.store import Catalog, Jobs
from shared.training_jobs import NO_SUCH_TRAINING_JOB, training_job_name

logger = Logger()


@cache
def _clients() -> dict[str, Any]:
    import boto3

    session = boto3.session.Session()
    return {"jobs": Jobs(session=session), "catalog": Catalog(session=session), "s3": session.client("s3"),
            "sagemaker": session.client("sagemaker"), "bus": Bus(session=session)}


def reconcile() -> dict[str, Any]:
    """One pass over the jobs in flight: how many were checked, moved, not yet created, unreadable."""
    from botocore.exceptions import BotoCoreError, ClientError

    c = _clients()
    summary = {"checked": 0, "moved": [], "not_created": 0, "errors": 0}
    for job in c["jobs"].in_flight():
        summary["checked"] += 1
        name = training_job_name(job["job_id"])
        try:
            description = c["sagemaker"].describe_training_job(TrainingJobName=name)
            detail = state_change_of(description)
            if SAGEMAKER_STATUS.get(detail.get("TrainingJobStatus", "")) == job["status"]:
                continue  # SageMaker and the job agree: nothing was missed
            outcome = follow(detail, jobs=c["jobs"], catalog=c["catalog"], s3=c["s3"], bus=c["bus"],
                             artifacts_bucket=os.environ["ARTIFACTS_BUCKET"])
        except ClientError as exc:
            if exc.response["Error"].get("Code") in NO_SUCH_TRAINING_JOB:
                summary["not_created"] += 1  # still launching: the launch queue holds its message
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


@logger.inject_lambda_context
def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    summary = reconcile()
    logger.info("reconciled", extra=summary)
    return summary
