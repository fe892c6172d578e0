"""Job routes: price, submit, list, show and cancel training and contraction jobs.

Every route acts for the caller's tenant only; another tenant's job is a 404, never a 403.
"""


from typing import Annotated, Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.event_handler import Response, content_types
from aws_lambda_powertools.event_handler.api_gateway import Router
from aws_lambda_powertools.event_handler.openapi.params import Body, Header, Path, Query

from functions.api import context
from shared.admission import accept, resolve
from shared.budgets import budget_of, quote
from shared.cancelling import cancel
from shared.errors import JobError, not_found
from shared.events import announce
from shared.lifecycle import END_STATUSES, JOB_ID_PATTERN, is_active
from shared.outputs import METRICS_MAX_POINTS, read_metrics_log, read_progress
from shared.responses import Curve, Job, JobList, Quote
from shared.settings import JobRequest

logger = Logger(child=True)
router = Router()

def public(job: dict[str, Any]) -> Job:
    """A stored job as its owner sees it: the fields of the Job model (the record carries a few more
    for launching)."""
    return Job.model_validate(job)


def resolve_request(request: Any, owner: str) -> dict[str, Any]:
    """Admission's check and price of `owner`'s job request (nothing stored)."""
    return resolve(
        request,
        owner,
        catalog=context.catalog(),
        datasets=context.datasets(),
        data_bucket=context.env("DATA_BUCKET"),
        s3=context.objects(),
    )


def _quote(job: dict[str, Any]) -> dict[str, Any]:
    return quote(job, budget_of(job["owner"], tenants=context.tenants()))


@router.post("/jobs/estimate", summary="Estimate a job",
             description="Validate and price a job without creating it: tokens, tier, fees, total, ETA, and "
             "whether the caller's remaining budget lets it run (allowed_to_proceed).",
             responses=context.responses({200: ("The estimate", Quote)}, 415))
def estimate_job(request: Annotated[JobRequest, Body()]) -> Quote:
    return _quote(resolve_request(request, context.tenant(router)))


@router.post("/jobs", summary="Create a job",
             description="Validate, price, store and queue a train or contract job. "
             "With dry_run=true only the estimate is returned and nothing is created. A job that would take "
             "the caller past their budget is refused (402) before anything is stored. With an "
             "Idempotency-Key header, repeating the request (same key, same body) within 24 h returns the "
             "same job; the same key with another body is a 409.",
             responses=context.responses({201: ("The queued job", Job), 200: ("Dry run: the estimate", Quote)},
                                       402, 409, 415, 503))
def create_job(
    request: Annotated[JobRequest, Body()],
    dry_run: Annotated[bool, Query(description="Price the job without creating it.")] = False,
    idempotency_key: Annotated[str | None, Header(
        alias="idempotency-key", min_length=1, max_length=128,
        description="Any unique string (e.g. a UUID): retries with it never create a second job.")] = None,
) -> Response[Job | Quote]:
    if dry_run:
        return _json(200, _quote(resolve_request(request, context.tenant(router))))
    if idempotency_key is None:
        return _json(201, _create(request))
    from functions.api import idempotency

    owner = context.tenant(router)
    return _json(201, idempotency.once(owner, idempotency_key, request.model_dump(mode="json"),
                                       lambda: _create(request), lambda_context=getattr(router, "lambda_context", None)))


def _create(request: Any) -> dict[str, Any]:
    job = accept(request, context.tenant(router), catalog=context.catalog(), datasets=context.datasets(),
                 data_bucket=context.env("DATA_BUCKET"), s3=context.objects(), jobs=context.jobs(), tenants=context.tenants(),
                 sqs=context.client("sqs"), queue_url=context.env("LAUNCH_QUEUE_URL"))
    logger.append_keys(job_id=job["job_id"])
    return public(job).model_dump(mode="json")  # the idempotency record stores it as JSON


@router.get("/jobs", summary="List jobs", description="The caller's jobs, newest first.",
            responses=context.responses({200: ("The caller's jobs", JobList)}))
def list_jobs(limit: Annotated[int, Query(ge=1, le=100)] = 50) -> JobList:
    return JobList(jobs=[public(job) for job in context.jobs().list(context.tenant(router), limit)])


@router.get("/jobs/<job_id>", summary="Show a job",
            description="One job with its estimate, bill and, while it runs, its live progress.",
            responses=context.responses({200: ("The job", Job)}))
def get_job(job_id: Annotated[str, Path(max_length=64)]) -> Job:
    owner = context.tenant(router)
    job = context.jobs().get(job_id, owner) if JOB_ID_PATTERN.fullmatch(job_id) else None
    if job is None:
        raise not_found("job", "job_id", job_id)
    if is_active(job):
        job["progress"] = _progress(job_id)
    return public(job)


@router.post("/jobs/<job_id>/cancel", summary="Cancel a job",
             description="Stop a job: a queued job ends cancelled at once and pays nothing; a launching or "
             "running one becomes cancelling, its training job is stopped, and it ends cancelled, billed for "
             "the tokens it trained. Repeating it is harmless; a job that already ended is a 409.",
             responses=context.responses({200: ("The job, cancelled or cancelling", Job)}, 409, 503))
def cancel_job(job_id: Annotated[str, Path(max_length=64)]) -> Job:
    return public(cancel_and_announce(job_id, context.tenant(router)))


def cancel_and_announce(job_id: str, owner: str) -> dict[str, Any]:
    """Cancel a job or a tuning of `owner` and publish its new state; the stored record."""
    job = cancel(job_id, owner, jobs=context.jobs(), sagemaker=context.client("sagemaker"))
    try:
        job = announce(job, jobs=context.jobs(), bus=context.bus())
    except Exception:  # the cancel stands; the next state change publishes what this could not
        logger.warning("cancel not published", extra={"job_id": job_id}, exc_info=True)
    return job


@router.get("/jobs/<job_id>/metrics", summary="A job's training curve",
            description="Training loss per logged step and held-out perplexity per cycle, from the metrics log "
            "the trainer keeps beside its progress (synced while it runs): the whole curve so far, thinned to "
            "at most max_points loss points.",
            responses=context.responses({200: ("The job's curve", Curve)}, 503))
def get_job_metrics(
    job_id: Annotated[str, Path(max_length=64)],
    max_points: Annotated[int, Query(ge=2, le=METRICS_MAX_POINTS)] = METRICS_MAX_POINTS,
) -> Curve:
    owner = context.tenant(router)
    job = context.jobs().get(job_id, owner) if JOB_ID_PATTERN.fullmatch(job_id) else None
    if job is None:
        raise not_found("job", "job_id", job_id)
    try:
        curve = read_metrics_log(context.client("s3"), context.env("ARTIFACTS_BUCKET"), job_id,
                                 ended=job["status"] in END_STATUSES, max_points=max_points)
    except Exception as exc:
        logger.warning("metrics log unreadable", extra={"job_id": job_id}, exc_info=True)
        raise JobError(503, "unavailable", "the job's metrics log cannot be read now; retry shortly") from exc
    return {**curve, "status": job["status"]}


def _progress(job_id: str) -> dict[str, Any] | None:
    """Live progress from the checkpoint folder; never fails the request."""
    try:
        progress = read_progress(context.client("s3"), context.env("ARTIFACTS_BUCKET"), job_id)
        return progress.model_dump(mode="json") if progress else None
    except Exception:
        logger.warning("progress unreadable", extra={"job_id": job_id}, exc_info=True)
        return None


def _json(status: int, body: dict[str, Any]) -> Response:
    return Response(status_code=status, content_type=content_types.APPLICATION_JSON, body=body)
