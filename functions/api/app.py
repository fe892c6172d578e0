"""Fusion HTTP API: jobs, models and datasets behind API Gateway's JWT authorizer."""


import json
from typing import Any
from urllib.parse import unquote

from aws_lambda_powertools import Logger, Tracer
from aws_lambda_powertools.event_handler import APIGatewayHttpResolver, Response, content_types
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.event_handler.openapi.exceptions import (
    RequestUnsupportedContentType,
    RequestValidationError,
)

from functions.api import body, console, context, datasets, jobs, models, tunings
from shared.errors import JobError, describe_error
from shared.responses import ErrorResponse
from shared.snapstart import prepare_before_snapshot, renew_after_restore
from shared.telemetry import metrics

logger = Logger()
tracer = Tracer()


class _Resolver(APIGatewayHttpResolver):
    def _convert_matches_into_route_keys(self, match: Any) -> dict[str, str]:
        # Path parameters arrive as they were in the URL: decoded here, so their patterns and
        # lengths apply to what the caller meant (20 "é" are 20 characters, not 120).
        return {key: unquote(value) for key, value in super()._convert_matches_into_route_keys(match).items()}


app = _Resolver(enable_validation=True, json_body_deserializer=body.loads)
app.include_router(jobs.router)
app.include_router(models.router)
app.include_router(datasets.router)
app.include_router(console.router)
app.include_router(tunings.router)

# SnapStart: the clients a request uses are built before the snapshot (their service models parsed
# into it) and built anew after each restore (connections and credentials of this environment).
prepare_before_snapshot(lambda: (context.jobs().client, context.tenants().client, context.client("s3"),
                                 context.client("sqs"), context.bus().client, datasets._s3()))
renew_after_restore(context.reset, datasets._s3.cache_clear)

OPENAPI = {"title": "Fusion", "version": "1.0.0",
           "description": "Grow, train and contract language models; every job priced before it runs."}
BEARER = "bearerAuth"


def _spec() -> str:
    """The OpenAPI document: every operation takes the identity provider's JWT as a bearer token."""
    from aws_lambda_powertools.event_handler.openapi.models import HTTPBearer

    scheme = HTTPBearer(bearerFormat="JWT", description="A JWT from the identity provider; its sub claim is the tenant.")
    return app.get_openapi_json_schema(**OPENAPI, security_schemes={BEARER: scheme}, security=[{BEARER: []}])


@app.get("/openapi.json", include_in_schema=False)
def openapi() -> Response[str]:
    return Response(200, content_types.APPLICATION_JSON, _spec())


@app.get("/docs", include_in_schema=False)
def docs() -> Response[str]:
    """Swagger UI, self-contained (no CDN). What app.enable_swagger serves, but its OpenAPI
    models are imported on the first /docs request instead of on every cold start."""
    from pathlib import Path

    import aws_lambda_powertools.event_handler.openapi.swagger_ui as swagger_ui

    assets = Path(swagger_ui.__file__).parent
    spec = _spec().replace("</", "<\\/")
    html = swagger_ui.generate_swagger_html(
        spec,
        (assets / "swagger-ui-bundle.min.js").read_text(encoding="utf-8"),
        (assets / "swagger-ui.min.css").read_text(encoding="utf-8"),
        None,
        None,
        False,
    )
    return Response(200, "text/html", html)


def _error_body(code: str, message: str, details: list[dict[str, str]]) -> str:
    return json.dumps(ErrorResponse.model_validate({"error": {"code": code, "message": message, "details": details}}).model_dump())


def _error(status: int, code: str, message: str, details: list[dict[str, str]]) -> Response:
    return Response(status, content_types.APPLICATION_JSON, _error_body(code, message, details))


@app.exception_handler(JobError)
def refused(exc: JobError) -> Response:
    return _error(exc.status, exc.code, exc.message, exc.details)


@app.exception_handler(RequestValidationError)
def invalid_request(exc: RequestValidationError) -> Response:
    if any(error.get("loc", ("",))[0] == "response" for error in exc.errors()):  # our answer strayed from its model
        return internal(exc)
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


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_HTTP, clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    job_id = (event.get("pathParameters") or {}).get("job_id")
    if job_id:  # every line logged for a request about a job names it (a new job's id is added when created)
        logger.append_keys(job_id=job_id)
    content_type = body.unsupported(event)
    if content_type is not None:  # before routing: Powertools would try to parse forms and multipart itself
        message = f"send JSON (application/json), not {content_type!r}" if content_type else \
            "send JSON with a content-type of application/json"
        error = _error_body("unsupported_media_type", message,
                            [{"field": "content-type", "message": "must be application/json"}])
        return {"statusCode": 415, "headers": {"Content-Type": content_types.APPLICATION_JSON}, "body": error,
                "isBase64Encoded": False}
    return app.resolve(event, context)
