"""The Fusion Training Console: static files served by the API itself, on the API's origin.

Same origin means the browser needs no CORS for the console's own calls, and the console ships
inside the API function (functions/Makefile copies console/ beside the package): one deployable,
no distribution to keep in step. The pages are public (no JWT authorizer on these routes); every
number they show comes from the API's routes, which are not.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import cache
from pathlib import Path
from typing import Annotated, Any

from aws_lambda_powertools.event_handler import Response, content_types
from aws_lambda_powertools.event_handler.api_gateway import Router
from aws_lambda_powertools.event_handler.openapi.params import Path as PathParam

from shared.errors import not_found

router = Router()

# Locally the repository root holds console/; in the Lambda package it sits beside functions/.
CONSOLE_DIR = Path(os.environ.get("FUSION_CONSOLE_DIR") or Path(__file__).resolve().parents[2] / "console")
CONSOLE_PATH = "/console"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".json": content_types.APPLICATION_JSON}
# Sign-in settings of a deployed console (template.yaml sets them); without a client id there is no sign-in.
AUTH_ENV = {"client_id": "FUSION_CONSOLE_CLIENT_ID", "issuer": "FUSION_CONSOLE_ISSUER",
            "authorize_url": "FUSION_CONSOLE_AUTHORIZE_URL", "token_url": "FUSION_CONSOLE_TOKEN_URL",
            "scope": "FUSION_CONSOLE_SCOPE"}


@cache
def _files() -> dict[str, Path]:
    return {p.name: p for p in CONSOLE_DIR.iterdir() if p.is_file() and p.suffix in TYPES} if CONSOLE_DIR.is_dir() else {}


@cache
def _content(name: str) -> tuple[str, str]:
    """(the file's text, its ETag): a file is read and hashed once per function instance."""
    text = _files()[name].read_text(encoding="utf-8")
    return text, '"' + hashlib.sha256(text.encode()).hexdigest()[:20] + '"'


def _file(name: str) -> Response[str]:
    """A console file: gzip-compressed when the browser accepts it, revalidated by its ETag on each
    load (no-cache), so a new deploy is seen at once and an unchanged file costs a 304."""
    path = _files().get(name)
    if path is None:
        raise not_found("console file", "path", name)
    text, etag = _content(name)
    headers = {"cache-control": "no-cache", "etag": etag, "x-content-type-options": "nosniff"}
    if name == "index.html":
        headers["content-security-policy"] = ("default-src 'self'; connect-src *; img-src 'self' data:; "
                                              "style-src 'self'; script-src 'self'; frame-ancestors 'none'")
    asked = router.current_event.headers.get("if-none-match") or ""
    if etag in (tag.strip() for tag in asked.split(",")):
        return Response(304, TYPES[path.suffix], "", headers=headers)
    return Response(200, TYPES[path.suffix], text, headers=headers, compress=True)


def auth_config() -> dict[str, Any] | None:
    values = {key: os.environ.get(name, "") for key, name in AUTH_ENV.items()}
    if not values["client_id"]:
        return None
    values["scope"] = values["scope"] or "openid"
    return values


@router.get("/", include_in_schema=False)
def root() -> Response[str]:
    return Response(302, content_types.TEXT_PLAIN, "", headers={"location": CONSOLE_PATH})


@router.get("/console", include_in_schema=False)
def index() -> Response[str]:
    return _file("index.html")


@router.get("/console/config.json", include_in_schema=False)
def config() -> Response[str]:
    """Where the console signs in (null: no sign-in, as on the local stack)."""
    return Response(200, content_types.APPLICATION_JSON, json.dumps({"auth": auth_config()}),
                    headers={"cache-control": "no-cache"})


@router.get("/console/<name>", include_in_schema=False)
def asset(name: Annotated[str, PathParam(max_length=64)]) -> Response[str]:
    return _file(name or "index.html")
