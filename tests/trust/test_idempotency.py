"""Idempotency-Key on POST /jobs: Powertools idempotency on the template's idempotency table (moto)."""

from __future__ import annotations

import json

from shared.store import Jobs

from .conftest import train
from tests.conftest import LambdaContext


def _post(aws, body, key, tenant="alice"):
    from functions.api.app import lambda_handler
    from local.server import api_event

    event = api_event("POST", "/jobs", headers={"content-type": "application/json", "Idempotency-Key": key},
                      body=json.dumps(body), claims={"sub": tenant})
    result = lambda_handler(event, LambdaContext())
    return result["statusCode"], json.loads(result["body"])


def _queued(aws):
    sqs = aws.session.client("sqs")
    return sqs.receive_message(QueueUrl=aws.env["LAUNCH_QUEUE_URL"], MaxNumberOfMessages=10).get("Messages", [])


def test_same_key_and_body_return_the_same_job_and_create_one(tenants):
    first = _post(tenants, train(turns=2), "key-1")
    again = _post(tenants, train(turns=2), "key-1")
    assert first[0] == again[0] == 201 and first[1] == again[1]
    assert [j["job_id"] for j in Jobs(session=tenants.session).list("alice")] == [first[1]["job_id"]]
    assert len(_queued(tenants)) == 1


def test_same_key_with_another_body_is_a_409_that_says_so(tenants):
    assert _post(tenants, train(turns=2), "key-2")[0] == 201
    status, body = _post(tenants, train(turns=3), "key-2")
    assert status == 409 and body["error"]["code"] == "idempotency_key_reused"
    assert "different request body" in body["error"]["message"]
    assert len(Jobs(session=tenants.session).list("alice")) == 1


def test_keys_are_per_tenant(tenants):
    alice = _post(tenants, train("alice"), "shared-key", tenant="alice")
    bob = _post(tenants, train("bob"), "shared-key", tenant="bob")
    assert alice[0] == bob[0] == 201 and alice[1]["job_id"] != bob[1]["job_id"]


def test_a_refused_request_does_not_use_up_its_key(tenants):
    status, _ = _post(tenants, train(turns=0), "key-3")
    assert status == 422
    status, body = _post(tenants, {**train(), "dataset": "ds-nonexistent0"}, "key-3")
    assert status == 404  # the key was not stored with the invalid body: this is judged afresh
    assert _post(tenants, train(), "key-3")[0] == 201


def test_without_a_key_every_post_is_a_new_job(tenants, api):
    assert api("POST", "/jobs", train())[1]["job_id"] != api("POST", "/jobs", train())[1]["job_id"]


def test_the_key_is_stored_for_24_hours(tenants):
    import time

    _post(tenants, train(), "key-4")
    [item] = tenants.session.client("dynamodb").scan(TableName=tenants.env["IDEMPOTENCY_TABLE"])["Items"]
    assert abs(int(item["expiration"]["N"]) - time.time() - 24 * 3600) < 60
    assert item["status"]["S"] == "COMPLETED"
