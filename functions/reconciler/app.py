"""Reconciler: on a schedule, settle the jobs whose SageMaker state change never arrived.

EventBridge invokes the events function asynchronously: an event whose handling keeps failing
is dropped after Lambda's retries (to the on-failure destination), and then nothing would move
its job again: a job left running forever, unbilled, its model unregistered. Every run
(shared.state_changes.reconcile_in_flight) compares each job in flight with DescribeTrainingJob
and follows what SageMaker says now the way the events function follows an event; the
forward-only writes make it a no-op for a job whose events did arrive, so the job, model and
bill are those the events make. Tunings are compared with DescribeHyperParameterTuningJob the same
way (shared.tunings.reconcile_tunings).
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

from aws_lambda_powertools import Logger, Tracer

from shared.events import Bus
from shared.state_changes import reconcile_in_flight
from shared.store import Catalog, Jobs
from shared.telemetry import metrics
from shared.tunings import reconcile_tunings

logger = Logger()
tracer = Tracer()


@cache
def _clients() -> dict[str, Any]:
    import boto3

    session = boto3.session.Session()
    return {"jobs": Jobs(session=session), "catalog": Catalog(session=session), "s3": session.client("s3"),
            "sagemaker": session.client("sagemaker"), "bus": Bus(session=session)}


def reconcile() -> dict[str, Any]:
    c = _clients()
    summary = reconcile_in_flight(jobs=c["jobs"], catalog=c["catalog"], s3=c["s3"], sagemaker=c["sagemaker"],
                                  bus=c["bus"], artifacts_bucket=os.environ["ARTIFACTS_BUCKET"])
    tunings = reconcile_tunings(jobs=c["jobs"], sagemaker=c["sagemaker"], s3=c["s3"], bus=c["bus"],
                                artifacts_bucket=os.environ["ARTIFACTS_BUCKET"])
    return {key: summary[key] + tunings[key] for key in summary}


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    summary = reconcile()
    logger.info("reconciled", extra=summary)
    return summary
