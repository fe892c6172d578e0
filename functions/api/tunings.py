"""Tuning routes: price and start a tuning, list and show tunings with their ranked trials, cancel
one, and promote a trial to a train job (shared.tunings).

Every route acts for the caller's tenant only; another tenant's tuning is a 404, never a 403.
"""

from typing import Annotated, Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.event_handler import Response, content_types
from aws_lambda_powertools.event_handler.api_gateway import Router
from aws_lambda_powertools.event_handler.openapi.params import Body, Header, Path, Query

from functions.api import context
from functions.api.jobs import cancel_and_announce, resolve_request
from shared.admission import admit
from shared.budgets import budget_of, quote
from shared.errors import JobError
from shared.responses import Job, Tuning, TuningList, TuningQuote
from shared.telemetry import job_refused
from shared.tunings import PromoteRequest, TuningRequest, get_tuning, promotion, ranked_table, resolve_tuning

logger = Logger(child=True)
router = Router()

IDEMPOTENCY = Header(alias="idempotency-key", min_length=1, max_length=128,
                     description="Any unique string (e.g. a UUID): retries with it never create a second one.")


def public(job: dict[str, Any]) -> Tuning:
    """A stored tuning as its owner sees it, its trials ranked with their full runs' forecasts."""
    trials = ranked_table(job)
    best = next((t["name"] for t in trials if t["status"] == "completed" and t["perplexity"] is not None), None)
    return Tuning.model_validate({**job, **job["tuning"], "tuning_id": job["job_id"], "trials": trials,
                                  "best_trial": best})


def _resolve(request: TuningRequest) -> dict[str, Any]:
    try:
        return resolve_tuning(request, context.tenant(router), catalog=context.catalog(), datasets=context.datasets(),
                              data_bucket=context.env("DATA_BUCKET"), s3=context.objects())
    except JobError:
        job_refused()
        raise


@router.post("/tunings", summary="Start a tuning",
             description="Search the settings of a train job on SageMaker's tuner: up to max_trials short proxy "
             "trials (proxy_fraction of each full run's steps), ranked by held-out perplexity. Priced before it runs "
             "at max_trials x the dearest trial the ranges allow, admitted against the budget like any job, billed "
             "for the tokens its trials trained. With dry_run=true only the price is returned.",
             responses=context.responses({201: ("The queued tuning", Tuning), 200: ("Dry run: the price", TuningQuote)},
                                         402, 409, 415, 503))
def create_tuning(
    request: Annotated[TuningRequest, Body()],
    dry_run: Annotated[bool, Query(description="Price the tuning without starting it.")] = False,
    idempotency_key: Annotated[str | None, IDEMPOTENCY] = None,
) -> Response[Tuning | TuningQuote]:
    if dry_run:
        job = _resolve(request)
        budget = budget_of(job["owner"], tenants=context.tenants())
        return _json(200, TuningQuote.model_validate({**quote(job, budget), "tuning": job["tuning"]}).model_dump(mode="json"))

    def create() -> dict[str, Any]:
        job = _admit(_resolve(request))
        logger.append_keys(job_id=job["job_id"])
        return public(job).model_dump(mode="json")

    if idempotency_key is None:
        return _json(201, create())
    from functions.api import idempotency

    body = {"route": "tunings", **request.model_dump(mode="json")}
    return _json(201, idempotency.once(context.tenant(router), idempotency_key, body, create,
                                       lambda_context=getattr(router, "lambda_context", None)))


def _admit(job: dict[str, Any]) -> dict[str, Any]:
    return admit(job, jobs=context.jobs(), tenants=context.tenants(), sqs=context.client("sqs"),
                 queue_url=context.env("LAUNCH_QUEUE_URL"))


@router.get("/tunings", summary="List tunings", description="The caller's tunings, newest first.",
            responses=context.responses({200: ("The caller's tunings", TuningList)}))
def list_tunings(limit: Annotated[int, Query(ge=1, le=100)] = 50) -> TuningList:
    jobs = context.jobs().list(context.tenant(router), 100)
    return TuningList(tunings=[public(job) for job in jobs if job.get("type") == "tuning"][:limit])


@router.get("/tunings/<tuning_id>", summary="Show a tuning",
            description="One tuning with its price and, once it has ended, its trials ranked best first: each "
            "one's settings, held-out perplexity and curve, cost, and what its full run would cost and take.",
            responses=context.responses({200: ("The tuning", Tuning)}))
def get(tuning_id: Annotated[str, Path(max_length=64)]) -> Tuning:
    return public(get_tuning(context.jobs(), tuning_id, context.tenant(router)))


@router.post("/tunings/<tuning_id>/cancel", summary="Cancel a tuning",
             description="Stop a tuning and its running trials; it ends cancelled, billed for what its trials trained.",
             responses=context.responses({200: ("The tuning, cancelled or cancelling", Tuning)}, 409, 503))
def cancel_tuning(tuning_id: Annotated[str, Path(max_length=64)]) -> Tuning:
    owner = context.tenant(router)
    get_tuning(context.jobs(), tuning_id, owner)
    return public(cancel_and_announce(tuning_id, owner))


@router.post("/tunings/<tuning_id>/promote", summary="Promote a trial to a train job",
             description="Create the full train job with the best trial's settings (or the trial named), through the "
             "same admission, budget and idempotency as POST /jobs. The job and its model record the tuning.",
             responses=context.responses({201: ("The queued train job", Job)}, 402, 409, 415, 503))
def promote(
    tuning_id: Annotated[str, Path(max_length=64)],
    request: Annotated[PromoteRequest, Body()] = None,
    idempotency_key: Annotated[str | None, IDEMPOTENCY] = None,
) -> Response[Job]:
    request = request or PromoteRequest()
    owner = context.tenant(router)
    tuning = get_tuning(context.jobs(), tuning_id, owner)
    as_job, trial = promotion(tuning, request)

    def create() -> dict[str, Any]:
        try:
            job = resolve_request(as_job, owner)
        except JobError:
            job_refused()
            raise
        job = _admit({**job, "tuning_id": tuning_id, "trial": trial["name"]})
        logger.append_keys(job_id=job["job_id"])
        return Job.model_validate(job).model_dump(mode="json")

    if idempotency_key is None:
        return _json(201, create())
    from functions.api import idempotency

    body = {"route": "promote", "tuning_id": tuning_id, **request.model_dump(mode="json")}
    return _json(201, idempotency.once(owner, idempotency_key, body, create,
                                       lambda_context=getattr(router, "lambda_context", None)))


def _json(status: int, body: dict[str, Any]) -> Response:
    return Response(status_code=status, content_type=content_types.APPLICATION_JSON, body=body)
