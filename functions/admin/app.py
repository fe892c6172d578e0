"""Fusion operators' API: every tenant's spend, and a tenant's budget.

Behind the same JWT authorizer as the tenants' API, and then only for members of the operators'
group (shared.admin.ADMIN_GROUP in the token's groups claim); anyone else is answered 403. A
function of its own, so that only its role may scan the tenants table and write a budget.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Annotated, Any

from aws_lambda_powertools import Logger, Tracer
from aws_lambda_powertools.event_handler import APIGatewayHttpResolver, Response, content_types
from aws_lambda_powertools.event_handler.openapi.exceptions import RequestValidationError
from aws_lambda_powertools.event_handler.openapi.params import Path

from shared.admin import ADMIN_GROUP, SetBudgetRequest, TenantSpend, TenantSpendList, is_admin, set_budget, tenant_spend
from shared.errors import describe_error
from shared.store import Tenants
from shared.tenancy import is_owner

logger = Logger()
tracer = Tracer()
app = APIGatewayHttpResolver(enable_validation=True)


@cache
def _tenants() -> Tenants:
    import boto3

    return Tenants(session=boto3.session.Session())


class Forbidden(Exception):
    pass


def _operator() -> None:
    authorizer = app.current_event.request_context.authorizer
    if not is_admin(authorizer.jwt_claim if authorizer else None):
        raise Forbidden()


@app.get("/admin/tenants")
def list_tenants() -> TenantSpendList:
    _operator()
    return tenant_spend(_tenants())


@app.put("/admin/tenants/<tenant>/budget")
def put_budget(tenant: Annotated[str, Path(min_length=1, max_length=256)], request: SetBudgetRequest) -> TenantSpend:
    _operator()
    if not is_owner(tenant):  # the tenants table is keyed by owner values (shared.tenancy.owner_of)
        raise RequestValidationError([{"loc": ("path", "tenant"), "type": "value_error",
                                       "msg": f"{tenant!r} is not a tenant's owner value (its sub, encoded)"}])
    spend = set_budget(tenant, request, _tenants())
    logger.info("budget set", extra={"tenant": tenant, "budget_usd": spend.budget_usd})
    return spend


def _error(status: int, code: str, message: str, details: list[dict[str, str]]) -> Response:
    body = {"error": {"code": code, "message": message, "details": details}}
    return Response(status, content_types.APPLICATION_JSON, json.dumps(body))


@app.exception_handler(Forbidden)
def forbidden(_: Forbidden) -> Response:
    message = f"only members of the {ADMIN_GROUP} group may use /admin"
    return _error(403, "forbidden", message, [{"field": "authorization", "message": message}])


@app.exception_handler(RequestValidationError)
def invalid(exc: RequestValidationError) -> Response:
    details = [describe_error(error) for error in exc.errors()]
    return _error(422, "invalid_request", f"the request has invalid fields: {', '.join(d['field'] for d in details)}",
                  details)


@app.exception_handler(json.JSONDecodeError)
def malformed(exc: json.JSONDecodeError) -> Response:
    return _error(422, "invalid_request", "malformed JSON", [{"field": "body", "message": str(exc)}])


@app.not_found
def no_route(_: Exception) -> Response:
    return _error(404, "not_found", f"no route {app.current_event.http_method} {app.current_event.path}", [])


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler
def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    return app.resolve(event, context)
