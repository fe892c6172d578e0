"""Shared fixtures: a moto AWS with every resource of template.yaml, and an HTTP API caller."""

from __future__ import annotations

import json
from functools import cache
from types import SimpleNamespace
from typing import Any

import boto3
import pytest
from moto import mock_aws

from local.resources import create_resources
from local.server import api_event
from shared.store import Catalog, seed_base_models

REGION = "us-east-1"


class LambdaContext:
    function_name = "fusion-test"
    memory_limit_in_mb = 512
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:fusion-test"
    aws_request_id = "test-request"

    def get_remaining_time_in_millis(self) -> int:
        return 30_000


@pytest.fixture
def aws(monkeypatch):
    """moto with the template's tables, queues, buckets and bus; the functions' env applied."""
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    for var in ("AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    with mock_aws():
        session = _session()
        env = create_resources(session)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        seed_base_models(Catalog(session=session), artifacts_bucket=env["ARTIFACTS_BUCKET"])
        # The functions' cached clients stay valid across cases: moto intercepts every client
        # while a mock is active, and table names, queue URLs and buckets are read from env per call.
        yield SimpleNamespace(session=session, env=env)


@cache
def _session() -> boto3.session.Session:
    return boto3.session.Session(region_name=REGION)


@pytest.fixture
def api(aws):
    """call(method, path, body=None, *, tenant="alice", query="") -> (status, parsed JSON body)."""
    from functions.api.app import lambda_handler

    def call(method: str, path: str, body: Any = None, *, tenant: str = "alice", query: str = "",
             raw: str | None = None) -> tuple[int, Any]:
        text = raw if raw is not None else (json.dumps(body) if body is not None else None)
        event = api_event(method, path, query=query, headers={"content-type": "application/json"},
                          body=text, claims={"sub": tenant})
        result = lambda_handler(event, LambdaContext())
        payload = result.get("body") or "null"
        try:
            return result["statusCode"], json.loads(payload)
        except json.JSONDecodeError:
            return result["statusCode"], payload

    return call
