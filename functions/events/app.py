"""Events: follow SageMaker training jobs to their end, and take job requests from pipelines.

Two EventBridge rules invoke it:
- "SageMaker Training Job State Change" for jobs named fusion-*: move the job forward, register
  the model, bill. Duplicates and late events change nothing (forward-only conditional writes).
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

from aws_lambda_powertools import Logger

from shared.admission import admit, resolve
from shared.errors import JobError, describe_error, invalid
from shared.events import JOB_REQUESTED, Bus, announce
from shared.state_changes import follow
from shared.store import Catalog, Datasets, Jobs, Tenants
from shared.tenancy import InvalidTenant, check_tenant

logger = Logger()


@cache
def _clients() -> dict[str, Any]:
    import boto3

    session = boto3.session.Session()
    return {"jobs": Jobs(session=session), "catalog": Catalog(session=session), "datasets": Datasets(session=session),
            "tenants": Tenants(session=session), "s3": session.client("s3"), "sqs": session.client("sqs"), "bus": Bus(session=session)}


@logger.inject_lambda_context
def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    detail = event.get("detail")
    detail = detail if isinstance(detail, dict) else {}  # a malformed event is ignored or refused, never raised on
    if event.get("detail-type") == JOB_REQUESTED:
        event_id = event.get("id")
        return job_requested(detail, event_id if isinstance(event_id, str) else None)
    return training_job_changed(detail)


def training_job_changed(detail: dict[str, Any]) -> dict[str, Any]:
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
    """A job request from a pipeline. A refusal is answered on the bus, not retried: it would fail again.

    The job id derives from the event id, so a redelivered request finds its job instead of
    creating a second one (and publishes what the first delivery could not).
    """
    import hashlib

    from pydantic import ValidationError

    from shared.settings import JOB_REQUEST

    c = _clients()
    owner, body = detail.get("owner"), detail.get("request")
    job_id = "r-" + hashlib.sha256(event_id.encode()).hexdigest()[:24] if event_id else None
    existing = c["jobs"].get(job_id, owner) if job_id and isinstance(owner, str) else None
    if existing is not None:
        announce(existing, jobs=c["jobs"], bus=c["bus"])
        return {"accepted": True, "job_id": job_id}
    try:
        try:
            check_tenant(owner)
        except InvalidTenant as exc:
            raise invalid("owner", f"a requested job names its owner (the tenant): {exc}") from None
        job = resolve(JOB_REQUEST.validate_python(body), owner, catalog=c["catalog"],
                      datasets=c["datasets"], data_bucket=os.environ["DATA_BUCKET"], job_id=job_id)
        admit(job, jobs=c["jobs"], tenants=c["tenants"], sqs=c["sqs"], queue_url=os.environ["LAUNCH_QUEUE_URL"])
    except ValidationError as exc:
        error = {"code": "invalid_request", "message": "the requested job has invalid fields",
                 "details": [describe_error(e) for e in exc.errors()]}
    except JobError as exc:
        error = {"code": exc.code, "message": exc.message, "details": exc.details}
    else:
        announce(job, jobs=c["jobs"], bus=c["bus"])
        logger.info("job requested", extra={"job_id": job["job_id"], "owner": owner})
        return {"accepted": True, "job_id": job["job_id"]}
    c["bus"].job_rejected(owner, body, error)
    return {"accepted": False, "error": error}
