"""Fusion HTTP API: jobs, models and datasets behind API Gateway's JWT authorizer."""


import json
from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.event_handler import APIGatewayHttpResolver, Response, content_types
from aws_lambda_powertools.event_handler.openapi.exceptions import (
    RequestUnsupportedContentType,
    RequestValidationError,
)

from functions.api import console, datasets, jobs, models
from shared.jobs import JobError, describe_error

logger = Logger()
app = APIGatewayHttpResolver(enable_validation=True)
app.include_router(jobs.router)
app.include_router(models.router)
app.include_router(datasets.router)
app.include_router(console.router)

OPENAPI = {"title": "Fusion", "version": "1.0.0",
           "description": "Grow, train and contract language models; every job priced before it runs."}


@app.get("/openapi.json", include_in_schema=False)
def openapi() -> Response[str]:
    return Response(200, content_types.APPLICATION_JSON, app.get_openapi_json_schema(**OPENAPI))


@app.get("/docs", include_in_schema=False)
def docs() -> Response[str]:
    """Swagger UI, self-contained (no CDN). What app.enable_swagger serves, but its OpenAPI
    models are imported on the first /docs request instead of on every cold start."""
    from pathlib import Path

    import aws_lambda_powertools.event_handler.openapi.swagger_ui as swagger_ui

    assets = Path(swagger_ui.__file__).parent
    spec = app.get_openapi_json_schema(**OPENAPI).replace("</", "<\\/")
    html = swagger_ui.generate_swagger_html(
        spec,
        (assets / "swagger-ui-bundle.min.js").read_text(encoding="utf-8"),
        (assets / "swagger-ui.min.css").read_text(encoding="utf-8"),
        None,
        None,
        False,
    )
    return Response(200, "text/html", html)


def _error(status: int, code: str, message: str, details: list[dict[str, str]]) -> Response:
    body = {"error": {"code": code, "message": message, "details": details}}
    return Response(status, content_types.APPLICATION_JSON, json.dumps(body))


@app.exception_handler(JobError)
def refused(exc: JobError) -> Response:
    return _error(exc.status, exc.code, exc.message, exc.details)


@app.exception_handler(RequestValidationError)
def invalid_request(exc: RequestValidationError) -> Response:
    details = [describe_error(error) for error in exc.errors()]
    fields = ", ".join(d["field"] for d in details)
    return _error(422, "invalid_request", f"the request has invalid fields: {fields}", details)


@app.exception_handler(UnicodeDecodeError)
def undecodable(exc: UnicodeDecodeError) -> Response:
    message = "malformed JSON: the body is not UTF-8 text"
    return _error(422, "invalid_request", message, [{"field": "body", "message": message}])


@app.exception_handler(RequestUnsupportedContentType)
def unsupported_content(exc: RequestUnsupportedContentType) -> Response:
    content_type = app.current_event.headers.get("content-type", "")
    return _error(415, "unsupported_media_type", f"send JSON (application/json), not {content_type!r}",
                  [{"field": "content-type", "message": "must be application/json"}])


@app.exception_handler(Exception)
def internal(exc: Exception) -> Response:
    """A fault of ours: logged with its trace, answered in the same error shape, never with details."""
    logger.exception("unhandled error")
    return _error(500, "internal_error", "the request failed on our side; it is safe to retry", [])


@app.not_found
def no_route(exc: Exception) -> Response:
    return _error(404, "not_found", f"no route {app.current_event.http_method} {app.current_event.path}", [])


def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    return app.resolve(event, context)
