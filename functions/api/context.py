"""What every route needs: the caller's tenant and the lazily created stores and clients."""

from __future__ import annotations

import os
from functools import cache
from typing import Any

from aws_lambda_powertools.event_handler.api_gateway import Router
from pydantic import BaseModel

from shared.errors import JobError
from shared.events import Bus
from shared.responses import ErrorResponse
from shared.store import Catalog, Datasets, Jobs, Tenants
from shared.tenancy import InvalidTenant, owner_of


def tenant(router: Router) -> str:
    """The caller's owner value (shared.tenancy.owner_of) of the JWT `sub` claim that API Gateway's
    authorizer verified: what every record, key and prefix of theirs holds."""
    context = router.current_event.request_context
    claims = context.authorizer.jwt_claim if context.authorizer else None
    owner = (claims or {}).get("sub")
    if not owner:
        raise JobError(401, "unauthorized", "the request carries no verified identity (JWT sub claim)")
    try:
        return owner_of(owner)
    except InvalidTenant as exc:
        raise JobError(401, "unauthorized", str(exc), [{"field": "authorization", "message": str(exc)}]) from None


@cache
def session() -> Any:
    from shared.snapstart import session as new_session

    return new_session()


@cache
def jobs() -> Jobs:
    return Jobs(session=session())


@cache
def catalog() -> Catalog:
    return Catalog(session=session())


@cache
def datasets() -> Datasets:
    return Datasets(session=session())


@cache
def tenants() -> Tenants:
    return Tenants(session=session())


@cache
def bus() -> Bus:
    return Bus(session=session())


@cache
def objects() -> Any:
    """S3 for what admission and the catalog look up: does a base model's archive exist, is a
    dataset's object still the one its check admitted."""
    return session().client("s3")


@cache
def client(service: str) -> Any:
    if service == "s3":  # progress reads are best effort: fail fast rather than hold the request
        from botocore.config import Config

        return session().client("s3", config=Config(connect_timeout=1, read_timeout=1, retries={"max_attempts": 1}))
    return session().client(service)


@cache
def runtime() -> Any:
    """SageMaker's runtime, for a model's endpoint: one try, and our answer (a 503) before API
    Gateway's 30 s run out."""
    from botocore.config import Config

    return session().client("sagemaker-runtime", config=Config(connect_timeout=2, read_timeout=25,
                                                                 retries={"max_attempts": 1}))


def env(name: str) -> str:
    return os.environ[name]


def reset() -> None:
    """Forget cached clients (tests switch AWS backends between cases)."""
    for cached in (session, jobs, catalog, datasets, tenants, bus, client, objects, runtime):
        cached.cache_clear()


ERROR_WORDS = {
    400: "Malformed request", 401: "No verified identity", 402: "Over the tenant's budget",
    404: "Not found (or not the caller's)", 409: "Conflicts with the current state", 415: "Not JSON",
    422: "Invalid fields, each named", 500: "A fault of ours (safe to retry)", 503: "A dependency is unavailable",
}


def responses(success: dict[int, tuple[str, type[BaseModel]]], *errors: int) -> dict[int, dict[str, Any]]:
    """OpenAPI responses of a route: each success with the model of its body, and the errors it can
    answer, all in one shape."""
    out: dict[int, dict[str, Any]] = {
        status: {"description": words, "content": {"application/json": {"model": model}}}
        for status, (words, model) in success.items()
    }
    for status in sorted({401, 404, 422, 500, *errors}):
        out[status] = {"description": ERROR_WORDS[status], "content": {"application/json": {"model": ErrorResponse}}}
    return out
