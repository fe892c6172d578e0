"""Job routes: price, submit, list and show training and contraction jobs."""


from typing import Annotated, Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.event_handler import Response, content_types
from aws_lambda_powertools.event_handler.api_gateway import Router
from aws_lambda_powertools.event_handler.openapi.params import Body, Path, Query

from functions.api import context
from shared import jobs as domain
from shared.settings import JobRequest

logger = Logger(child=True)
router = Router()


def _resolve(request: Any) -> dict[str, Any]:
    return domain.resolve(
        request,
        context.tenant(router),
        catalog=context.catalog(),
        datasets=context.datasets(),
        data_bucket=context.env("DATA_BUCKET"),
    )


def _quote(job: dict[str, Any]) -> dict[str, Any]:
    return {k: job[k] for k in ("type", "model", "dataset", "settings", "estimate", "warnings")}


@router.post("/jobs/estimate", summary="Estimate a job",
             description="Validate and price a job without creating it: tokens, tier, fees, total and ETA.")
def estimate_job(request: Annotated[JobRequest, Body()]) -> dict[str, Any]:
    return _quote(_resolve(request))


@router.post("/jobs", summary="Create a job",
             description="Validate, price, store and queue a train or contract job. "
             "With dry_run=true only the estimate is returned and nothing is created.",
             responses={201: {"description": "The queued job"}, 200: {"description": "Dry run: the estimate"}})
def create_job(
    request: Annotated[JobRequest, Body()],
    dry_run: Annotated[bool, Query(description="Price the job without creating it.")] = False,
) -> Response[dict[str, Any]]:
    job = _resolve(request)
    if dry_run:
        return _json(200, _quote(job))
    domain.submit(job, jobs=context.jobs(), sqs=context.client("sqs"), queue_url=context.env("LAUNCH_QUEUE_URL"))
    return _json(201, domain.public(job))


@router.get("/jobs", summary="List jobs", description="The caller's jobs, newest first.")
def list_jobs(limit: Annotated[int, Query(ge=1, le=100)] = 50) -> dict[str, Any]:
    return {"jobs": [domain.public(job) for job in context.jobs().list(context.tenant(router), limit)]}


@router.get("/jobs/<job_id>", summary="Show a job",
            description="One job with its estimate, bill and, while it runs, its live progress.")
def get_job(job_id: Annotated[str, Path(max_length=64)]) -> dict[str, Any]:
    owner = context.tenant(router)
    job = context.jobs().get(job_id, owner) if domain.JOB_ID_PATTERN.fullmatch(job_id) else None
    if job is None:
        raise domain.not_found("job", "job_id", job_id)
    if domain.is_active(job):
        job["progress"] = _progress(job_id)
    return domain.public(job)


def _progress(job_id: str) -> dict[str, Any] | None:
    """Live progress from the checkpoint folder; never fails the request."""
    try:
        return domain.read_progress(context.client("s3"), context.env("ARTIFACTS_BUCKET"), job_id)
    except Exception:
        logger.warning("progress unreadable", extra={"job_id": job_id}, exc_info=True)
        return None


def _json(status: int, body: dict[str, Any]) -> Response:
    return Response(status_code=status, content_type=content_types.APPLICATION_JSON, body=body)
