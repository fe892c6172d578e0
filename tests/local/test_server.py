"""The local HTTP server: real HTTP on loopback into the same Lambda handler."""

import pytest

from local.server import api_event, claims_of
from tests.conftest import http, unsigned_jwt


def test_claims_come_from_the_bearer_token():
    assert claims_of(None) == {"sub": "local"}
    assert claims_of(f"Bearer {unsigned_jwt({'sub': 'alice', 'aud': 'x'})}")["sub"] == "alice"
    with pytest.raises(ValueError):
        claims_of("Bearer not-a-jwt")
    with pytest.raises(ValueError):
        claims_of(f"Bearer {unsigned_jwt({'aud': 'x'})}")


def test_api_event_is_an_http_api_v2_event():
    event = api_event("POST", "/jobs", query="dry_run=true&a=1&a=2", body="{}", claims={"sub": "bob"})
    assert event["version"] == "2.0" and event["requestContext"]["http"]["method"] == "POST"
    assert event["queryStringParameters"] == {"dry_run": "true", "a": "1,2"}
    assert event["requestContext"]["authorizer"]["jwt"]["claims"]["sub"] == "bob"


def test_jobs_over_http_are_scoped_by_the_token(server, aws):
    body = {"type": "train", "model": "base-debug", "dataset": f"s3://{aws.env['DATA_BUCKET']}/alice/corpus/"}
    status, job = http(f"{server}/jobs", "POST", body, token=unsigned_jwt({"sub": "alice"}))
    assert status == 201 and job["owner"] == "alice"
    assert http(f"{server}/jobs/{job['job_id']}", token=unsigned_jwt({"sub": "alice"}))[0] == 200
    assert http(f"{server}/jobs/{job['job_id']}")[0] == 404  # no token: tenant "local"
    status, error = http(f"{server}/jobs", "POST", {"type": "train"}, token=unsigned_jwt({"sub": "alice"}))
    assert status == 422 and {d["field"] for d in error["error"]["details"]} == {"model", "dataset"}


def test_a_garbled_token_is_401(server):
    assert http(f"{server}/models", token="garbage")[0] == 401


def test_models_over_http(server):
    status, body = http(f"{server}/models")
    assert status == 200 and "base-tiny" in {m["model_id"] for m in body["models"]}


def test_start_in_process_aws_serves_the_seeded_catalog():
    """In a fresh process (the mock stays on for the life of the process): resources and base models."""
    import subprocess
    import sys

    code = (
        "from local.server import start_in_process_aws, api_event\n"
        "env = start_in_process_aws()\n"
        "from functions.api.app import lambda_handler\n"
        "import json\n"
        "models = json.loads(lambda_handler(api_event('GET', '/models'), None)['body'])['models']\n"
        "print(env['JOBS_TABLE'], sorted(m['model_id'] for m in models))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "POWERTOOLS_LOG_LEVEL": "WARNING"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "fusion-JobsTable" and "'base-debug'," in out.stdout
