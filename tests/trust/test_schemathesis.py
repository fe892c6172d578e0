"""The served OpenAPI spec of the local server, fuzzed by schemathesis over real HTTP on loopback
(moto in-process): no 5xx, and every response keeps to the spec (status, content type, and its
body to the model the spec names for it)."""

from __future__ import annotations

import base64
import itertools
import json
import threading

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from local.server import make_server
from tests.conftest import http

MAX_EXAMPLES = 25  # per operation and mode (valid, then invalid input)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
TRIED: list[str] = []


def _jwt(sub: str) -> str:
    encode = lambda part: base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode()
    return f"{encode({'alg': 'none'})}.{encode({'sub': sub})}."


@pytest.fixture
def served(tenants):
    httpd = make_server("127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.slow
def test_no_5xx_and_every_response_keeps_to_the_spec(served):
    _, document = http(f"{served}/openapi.json")
    bodies = [response["content"]["application/json"]["schema"] for operations in document["paths"].values()
              for operation in operations.values() for response in operation["responses"].values()]
    assert bodies and all("$ref" in body for body in bodies)  # each body has a model to conform to
    spec = schemathesis.openapi.from_url(f"{served}/openapi.json")
    operations = [result.ok() for result in spec.get_all_operations()]
    assert len(operations) >= 8
    for operation, mode in itertools.product(operations, schemathesis.GenerationMode):
        @given(case=operation.as_strategy(mode))
        @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case):
            case.headers = {**(case.headers or {}), "authorization": f"Bearer {_jwt('alice')}"}
            TRIED.append(f"{case.method} {operation.path}")
            case.call_and_validate(base_url=served, checks=CHECKS)

        try:
            fuzz()
        except Unsatisfiable:  # an operation without inputs has nothing to make invalid
            assert mode is schemathesis.GenerationMode.NEGATIVE
    print(f"\nschemathesis: {len(TRIED)} requests tried over {len(operations)} operations, valid and invalid")
    assert len(TRIED) >= 4 * len(operations)
    assert {"POST /jobs", "POST /jobs/estimate", "GET /jobs", "POST /jobs/{job_id}/cancel"} <= set(TRIED)
