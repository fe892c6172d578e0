"""Events: follow SageMaker training jobs to their end, and take job requests from pipelines.

Two EventBridge rules invoke it:
- "SageMaker Training Job State Change" for jobs named fusion-*: move the job forward, register
  the model, bill. Duplicates and late events change nothing (forward-only conditional writes).
- "SageMaker HyperParameter Tuning Job State Change" for tunings (fusion-tune-*): move the tuning
  forward; at its end read its trials, rank them and bill what they trained (shared.tunings).
- "Fusion Job Requested" on the Fusion bus ({"owner", "request": <POST /jobs body>}): the same
  validation, tenancy (the owner's catalog and data prefix) and budget as POST /jobs, then queued
  for launch; a refused request is answered with "Fusion Job Rejected".
Domain events are published after the state write and marked published after: a retry of a
delivery whose publishing failed publishes again (at least once) without changing state twice.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

from aws_lambda_powertools import Logger, Tracer

from shared.admission import requested
from shared.events import JOB_REQUESTED, Bus
from shared import snapstart
from shared.state_changes import follow
from shared.store import Catalog, Datasets, Jobs, Tenants
from shared.telemetry import metrics
from shared.training_jobs import job_id_of
from shared.tunings import TUNING_STATE_CHANGE, follow_tuning, tuning_id_of

logger = Logger()
tracer = Tracer()


@cache
def _clients() -> dict[str, Any]:
    session = snapstart.session()
    return {"jobs": Jobs(session=session), "catalog": Catalog(session=session), "datasets": Datasets(session=session),
            "tenants": Tenants(session=session), "s3": session.client("s3"), "sqs": session.client("sqs"), "bus": Bus(session=session),
            "sagemaker": session.client("sagemaker")}


# SnapStart: clients built before the snapshot, and anew after each restore.
snapstart.prepare_before_snapshot(lambda: (_clients()["jobs"].client, _clients()["bus"].client))
snapstart.renew_after_restore(_clients.cache_clear)


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    detail = event.get("detail")
    detail = detail if isinstance(detail, dict) else {}  # a malformed event is ignored or refused, never raised on
    if event.get("detail-type") == JOB_REQUESTED:
        event_id = event.get("id")
        return job_requested(detail, event_id if isinstance(event_id, str) else None)
    if event.get("detail-type") == TUNING_STATE_CHANGE:
        return tuning_changed(detail)
    return training_job_changed(detail)


def tuning_changed(detail: dict[str, Any]) -> dict[str, Any]:
    tuning_id = tuning_id_of(detail.get("HyperParameterTuningJobName"))
    if tuning_id:
        logger.append_keys(job_id=tuning_id)
    c = _clients()
    job = follow_tuning(detail, jobs=c["jobs"], sagemaker=c["sagemaker"], s3=c["s3"], bus=c["bus"],
                        artifacts_bucket=os.environ["ARTIFACTS_BUCKET"])
    if job is None:
        return {"changed": False}
    logger.info("tuning moved", extra={"job_id": job["job_id"], "status": job["status"]})
    return {"changed": True, "job_id": job["job_id"], "status": job["status"]}


def training_job_changed(detail: dict[str, Any]) -> dict[str, Any]:
    name = detail.get("TrainingJobName")
    if isinstance(name, str) and job_id_of(name):
        logger.append_keys(job_id=job_id_of(name))
    c = _clients()
    outcome = follow(detail, jobs=c["jobs"], catalog=c["catalog"], s3=c["s3"], bus=c["bus"],
                     artifacts_bucket=os.environ["ARTIFACTS_BUCKET"])
    if outcome.job is None:
        logger.info("no change", extra={"training_job": detail.get("TrainingJobName"),
                                        "sagemaker_status": detail.get("TrainingJobStatus")})
        return {"changed": False}
    logger.info("job moved", extra={"job_id": outcome.job["job_id"], "status": outcome.job["status"]})
    return {"changed": True, "job_id": outcome.job["job_id"], "status": outcome.job["status"]}


def job_requested(detail: dict[str, Any], event_id: str | None = None) -> dict[str, Any]:
    c = _clients()
    answer = requested(detail, event_id, catalog=c["catalog"], datasets=c["datasets"], jobs=c["jobs"],
                       tenants=c["tenants"], sqs=c["sqs"], bus=c["bus"], data_bucket=os.environ["DATA_BUCKET"], s3=c["s3"],
                       queue_url=os.environ["LAUNCH_QUEUE_URL"])
    logger.info("job requested", extra={"owner": detail.get("owner"), **answer})
    return answer
