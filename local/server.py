"""The Fusion HTTP API on loopback, through the very handler API Gateway invokes.

Each HTTP request becomes an API Gateway HTTP API (payload 2.0) event. The JWT in
`Authorization: Bearer` is decoded but NOT verified (local use only: API Gateway's authorizer
verifies it in AWS); without an Authorization header the caller is tenant "local" (and on /admin
an operator, as a deployed member of the operators' group), and any other
scheme (Basic, a bare token) is a 401, as the deployed authorizer answers it.

The edge keeps API Gateway's limits: a body over its payload quota is a 413 and is never read, a
body is read in full before the handler sees it (short, duplicated or unreadable lengths are a
400), and a connection that sends too slowly is closed with a 408, without holding any other
request up.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from local.aws import LOCAL_ACCOUNT, LOCAL_REGION, LambdaContext
from shared.tenancy import check_tenant

LOCAL_TENANT = "local"
# Pending connections the listening socket holds while every thread is busy: enough for a burst
# of concurrent clients (the standard library's default of 5 resets the sixth).
LISTEN_BACKLOG = 128
API_TIMEOUT_S = 30  # the API function's timeout in template.yaml
# API Gateway HTTP API quotas: "Payload size 10 MB" (not adjustable).
MAX_BODY_BYTES = 10 * 1024 * 1024
# A client gets this long for each read of its request, and for its whole body.
READ_TIMEOUT_S = 10
BODY_DEADLINE_S = 30
# One event at a time through the handler, as one Lambda instance takes them: the resolver keeps the
# current event on itself, so two threads inside it at once (a browser loads files in parallel)
# would answer each other's requests.
_HANDLER_LOCK = threading.Lock()


def claims_of(authorization: str | None) -> dict[str, Any]:
    """The payload of an unsigned-or-signed bearer JWT, unverified; {"sub": "local"} without an
    Authorization header; ValueError for any other scheme."""
    if authorization is None:
        return {"sub": LOCAL_TENANT}
    if not authorization.lower().startswith("bearer ") or not authorization[7:].strip():
        raise ValueError("the Authorization header must be `Bearer <JWT>`")
    token = authorization.split(None, 1)[1].strip()
    parts = token.split(".")
    if len(parts) < 2:
        raise ValueError("the bearer token is not a JWT")
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (ValueError, RecursionError):
        raise ValueError("the bearer token's payload is not JSON") from None
    if not isinstance(claims, dict) or not claims.get("sub"):
        raise ValueError("the bearer token has no sub claim")
    check_tenant(claims["sub"])  # API Gateway passes claims on as they are: the handler refuses them too
    return claims


def api_event(
    method: str,
    path: str,
    *,
    query: str = "",
    headers: dict[str, str] | None = None,
    body: str | bytes | None = None,
    claims: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An API Gateway HTTP API v2 event, as the JWT authorizer would pass it on."""
    headers = {k.lower(): v for k, v in (headers or {}).items()}
    is_base64 = isinstance(body, bytes)
    if is_base64:
        body = base64.b64encode(body).decode()
    params: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        params[key] = f"{params[key]},{value}" if key in params else value
    return {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": query,
        "headers": headers,
        "queryStringParameters": params or None,
        "requestContext": {
            "accountId": LOCAL_ACCOUNT,
            "apiId": "local",
            "authorizer": {"jwt": {"claims": claims or {"sub": LOCAL_TENANT}, "scopes": None}},
            "domainName": headers.get("host", "localhost"),
            "http": {"method": method, "path": path, "protocol": "HTTP/1.1", "sourceIp": "127.0.0.1",
                     "userAgent": headers.get("user-agent", "")},
            "requestId": uuid.uuid4().hex,
            "routeKey": "$default",
            "stage": "$default",
            "time": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime()),
            "timeEpoch": int(time.time() * 1000),
        },
        "body": body,
        "isBase64Encoded": is_base64,
    }


class _BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _Handler(BaseHTTPRequestHandler):
    server_version = "fusion-local"
    timeout = READ_TIMEOUT_S  # on the socket: a request line, header or body read that stalls ends

    def _serve(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/admin" or url.path.startswith("/admin/"):  # template.yaml: the AdminFunction's routes
            from functions.admin.app import lambda_handler
        else:
            from functions.api.app import lambda_handler
        try:
            raw = self._body()
        except _BadRequest as bad:
            self.close_connection = True  # the body's end is unknown: nothing after it can be read
            code = {408: "request_timeout", 411: "length_required", 413: "payload_too_large"}.get(bad.status,
                                                                                                  "invalid_request")
            return self._error(bad.status, code, str(bad), "content-length")
        authorization = self.headers.get_all("authorization") or []
        try:
            if len(authorization) > 1:
                raise ValueError("one Authorization header, not several")
            claims = claims_of(authorization[0] if authorization else None)
        except (ValueError, UnicodeDecodeError) as exc:
            return self._error(401, "unauthorized", str(exc), "authorization")
        if not self.headers.get("authorization") and url.path.startswith("/admin"):
            from shared.admin import ADMIN_GROUP, GROUPS_CLAIM

            claims = {**claims, GROUPS_CLAIM: f"[{ADMIN_GROUP}]"}  # as API Gateway passes a list claim on
        try:
            text: str | bytes | None = raw.decode() if raw else None
        except UnicodeDecodeError:
            text = raw
        event = api_event(self.command, url.path, query=url.query, headers=dict(self.headers.items()),
                          body=text, claims=claims)
        with _HANDLER_LOCK:  # held for the handler only: bodies are read (and refused) outside it
            result = lambda_handler(event, LambdaContext("fusion-api-local", API_TIMEOUT_S))
        payload = result.get("body") or ""
        data = base64.b64decode(payload) if result.get("isBase64Encoded") else payload.encode()
        self._reply(result.get("statusCode", 200), result.get("headers") or {}, data)

    def _body(self) -> bytes:
        """The request body, read in full within BODY_DEADLINE_S; _BadRequest for a length that is
        missing where a body is sent, repeated, not a number, over MAX_BODY_BYTES, or longer than
        what arrives."""
        if self.headers.get("transfer-encoding"):
            raise _BadRequest(411, "send the body with a content-length (no transfer-encoding)")
        declared = self.headers.get_all("content-length") or []
        if len(declared) > 1:
            raise _BadRequest(400, "one content-length header, not several")
        value = (declared[0] if declared else "0").strip()
        if not value.isdigit() or not value.isascii():
            raise _BadRequest(400, "content-length must be a whole number of bytes")
        length = int(value)
        if length > MAX_BODY_BYTES:
            raise _BadRequest(413, f"the body is {length} bytes; at most {MAX_BODY_BYTES} (API Gateway's payload limit)")
        deadline = time.monotonic() + BODY_DEADLINE_S
        parts, remaining = [], length
        while remaining:
            if time.monotonic() > deadline:
                raise _BadRequest(408, f"the body did not arrive within {BODY_DEADLINE_S} s")
            try:
                part = self.rfile.read1(min(remaining, 1 << 16))
            except TimeoutError:
                raise _BadRequest(408, f"no byte of the body arrived for {READ_TIMEOUT_S} s") from None
            if not part:
                raise _BadRequest(400, f"the body ended after {length - remaining} of its {length} declared bytes")
            parts.append(part)
            remaining -= len(part)
        return b"".join(parts)

    def _error(self, status: int, code: str, message: str, field: str) -> None:
        body = {"error": {"code": code, "message": message, "details": [{"field": field, "message": message}]}}
        self._reply(status, {"content-type": "application/json"}, json.dumps(body).encode())

    def _reply(self, status: int, headers: dict[str, str], data: bytes) -> None:
        self.send_response(status)
        for key, value in headers.items():
            if key.lower() not in ("content-length", "connection"):
                self.send_header(key, value)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def __getattr__(self, name: str) -> Any:
        # Every method goes to the API, which answers one it has no route for in its own JSON
        # error shape (the standard library would answer an HTML 501).
        if name.startswith("do_"):
            return self._serve
        raise AttributeError(name)

    def log_message(self, format: str, *args: Any) -> None:
        if os.environ.get("FUSION_LOG_REQUESTS"):
            super().log_message(format, *args)


def make_server(host: str = "127.0.0.1", port: int = 8080, *, environ: dict[str, str] | None = None) -> ThreadingHTTPServer:
    """A bound, not yet serving, server (port 0 picks a free one: see server.server_address)."""
    if environ:
        os.environ.update(environ)
    return _Server((host, port), _Handler)


class _Server(ThreadingHTTPServer):
    request_queue_size = LISTEN_BACKLOG


def start_in_process_aws(template_path: str | Path | None = None, *, region: str = LOCAL_REGION) -> dict[str, str]:
    """Start moto in this process, create the template's resources and seed the base models.

    Returns (and applies to os.environ) the functions' environment. The mock stays active for
    the life of the process; boto3 clients created from now on talk to it.
    """
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "local")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "local")
    os.environ.setdefault("AWS_DEFAULT_REGION", region)
    import boto3
    from moto import mock_aws

    from local.resources import TEMPLATE, create_resources
    from shared.store import Catalog, seed_base_models

    mock = mock_aws()
    mock.start()
    session = boto3.session.Session(region_name=os.environ["AWS_DEFAULT_REGION"])
    environ = create_resources(session, template_path or TEMPLATE)
    os.environ.update(environ)
    seed_base_models(Catalog(session=session), artifacts_bucket=environ["ARTIFACTS_BUCKET"])
    return environ
