"""Hostile input: every refusal is a 4xx naming its field (or a clean no-op), never a 500, and a
refused request leaves no record and no spend."""

from __future__ import annotations

import itertools
import json

import pytest

from functions.api.body import MAX_DEPTH
from shared.settings import MAX_HEALING_STEPS, MAX_LAYERS, MAX_STEPS_PER_TURN
from shared.store import Tenants

from .conftest import dataset_id, set_budget, train

JOB_ROUTES = [("POST", "/jobs", ""), ("POST", "/jobs/estimate", ""), ("POST", "/jobs", "dry_run=true")]
BODY_ROUTES = JOB_ROUTES + [("POST", "/datasets", "")]


def _contract(**hyper) -> dict:
    return {"type": "contract", "hyperparams": {"source_model_id": "m-alice", "num_layers_to_contract": 1, **hyper}}


def _nothing_stored(aws) -> None:
    ddb = aws.session.client("dynamodb")
    for table in ("JOBS_TABLE", "IDEMPOTENCY_TABLE"):
        assert ddb.scan(TableName=aws.env[table])["Items"] == []
    assert ddb.scan(TableName=aws.env["DATASETS_TABLE"])["Count"] == 2  # alice's and bob's, no new one
    assert int((Tenants(session=aws.session).get("alice") or {}).get("spent_cents", 0)) == 0


def _field(body: dict) -> str:
    return body["error"]["details"][0]["field"]


HUGE = [
    (json.dumps(train(train_steps=10**30)), "hyperparams.train_steps"),
    (json.dumps(train(train_steps=MAX_STEPS_PER_TURN + 1)), "hyperparams.train_steps"),
    (json.dumps(_contract(train_steps=10**30)), "hyperparams.train_steps"),
    (json.dumps(_contract(train_steps=MAX_HEALING_STEPS + 1)), "hyperparams.train_steps"),
    (json.dumps(_contract(num_layers_to_contract=MAX_LAYERS + 1)), "hyperparams.num_layers_to_contract"),
    (json.dumps(train(turns=10**20)), "hyperparams.turns"),
    (json.dumps(train()).replace('"hyperparams": {}', '"hyperparams": {"train_steps": 1' + "0" * 5000 + "}"), "body"),
]


def test_huge_integers_are_422_naming_the_field(tenants, api):
    for (method, path, query), (raw, field) in itertools.product(JOB_ROUTES, HUGE):
        status, body = api(method, path, raw=raw, query=query)
        assert status == 422 and _field(body) == field, (path, body)
    _nothing_stored(tenants)


def test_the_largest_settings_still_have_a_price(tenants, api):
    big = {"turns": 10, "cycles": 100, "steps_per_cycle": 100_000, "seq_len": 512}
    status, quote = api("POST", "/jobs/estimate", train(**big))
    assert status == 200 and float(quote["estimate"]["total"]) > 0
    status, quote = api("POST", "/jobs/estimate", train(train_steps=MAX_STEPS_PER_TURN, turns=10, seq_len=512))
    assert status == 200 and quote["allowed_to_proceed"] is False


def test_deep_nesting_is_422_on_every_json_route(tenants, api):
    nested = json.loads("[" * (MAX_DEPTH - 2) + "]" * (MAX_DEPTH - 2))  # as deep as may be, then deeper below
    for method, path, query in BODY_ROUTES:
        for raw in ("[" * 1000 + "]" * 1000, '{"a": ' * 1000 + "1" + "}" * 1000,
                    json.dumps(train(lr=[nested])), json.dumps({"name": [[nested]]})):
            status, body = api(method, path, raw=raw, query=query)
            assert status == 422 and "nested deeper" in body["error"]["details"][0]["message"], (path, body)
    _nothing_stored(tenants)


def test_a_body_that_is_not_json_is_415(tenants):
    from functions.api.app import lambda_handler
    from local.server import api_event
    from tests.conftest import LambdaContext

    types = ["multipart/form-data", "multipart/form-data; boundary=x", "application/x-www-form-urlencoded",
             "text/plain", ""]
    for (method, path, query), content_type in itertools.product(BODY_ROUTES, types):
        headers = {"content-type": content_type} if content_type else {}
        event = api_event(method, path, query=query, headers=headers, body=json.dumps(train()))
        result = lambda_handler(event, LambdaContext())
        body = json.loads(result["body"])
        assert result["statusCode"] == 415 and _field(body) == "content-type", (content_type, body)
    _nothing_stored(tenants)


STRICT = [
    (train(turns=True), "hyperparams.turns"),
    (train(turns="2"), "hyperparams.turns"),
    (train(turns=1.5), "hyperparams.turns"),
    (train(turns=1.0), "hyperparams.turns"),
    (train(cycles=False), "hyperparams.cycles"),
    (train(seq_len="128"), "hyperparams.seq_len"),
    (train(train_steps=10.0), "hyperparams.train_steps"),
    (train(lr=True), "hyperparams.lr"),
    (train(lr="0.001"), "hyperparams.lr"),
    (train(output_name=5), "hyperparams.output_name"),
    (_contract(contraction_ratio="0.5"), "hyperparams.contraction_ratio"),
    (_contract(contraction_ratio=True), "hyperparams.contraction_ratio"),
    (_contract(num_layers_to_contract="1"), "hyperparams.num_layers_to_contract"),
    (_contract(train_steps=True), "hyperparams.train_steps"),
    ({**train(), "model": 7}, "model"),
]


def test_types_are_strict(tenants, api):
    for (method, path, query), (request, field) in itertools.product(JOB_ROUTES, STRICT):
        status, body = api(method, path, request, query=query)
        assert status == 422 and _field(body) == field, (request, body)
    status, body = api("POST", "/datasets", {"name": "d", "format": ["jsonl"]})
    assert status == 422 and _field(body) == "format"
    _nothing_stored(tenants)
    # A whole number is still a number where a float is asked for.
    assert api("POST", "/jobs/estimate", train(lr=1))[0] == 200
    assert api("POST", "/jobs/estimate", _contract(contraction_ratio=0.5))[0] == 200


def test_duplicate_keys_and_non_json_numbers_are_refused(tenants, api):
    start = '{"type": "train", "model": "base-debug", "dataset": "ds-aaaaaaaaaaaa"'
    cases = [(start + ', "model": "base-tiny"}', "duplicate key 'model'"),
             (start + ', "hyperparams": {"turns": 1, "turns": 3}}', "duplicate key 'turns'"),
             (start + ', "hyperparams": {"lr": NaN}}', "NaN is not a JSON value"),
             (start + ', "hyperparams": {"lr": Infinity}}', "Infinity is not a JSON value"),
             (start + ', "hyperparams": {"lr": 1e999}}', "out of range")]
    for (method, path, query), (raw, words) in itertools.product(JOB_ROUTES, cases):
        status, body = api(method, path, raw=raw, query=query)
        assert status == 422 and _field(body) == "body" and words in body["error"]["details"][0]["message"], body
    _nothing_stored(tenants)


# --- no free jobs -----------------------------------------------------------------------------


def test_no_job_is_free_and_a_zero_budget_admits_nothing(tenants, api, sagemaker):
    from shared.pricing import price_table

    minimum = price_table().minimum_charge_usd
    tiny = train(train_steps=1, seq_len=16)
    status, quote = api("POST", "/jobs/estimate", tiny)
    assert status == 200 and quote["estimate"]["total"] == str(minimum) and minimum > 0
    set_budget(tenants, "alice", "0.00")
    status, quote = api("POST", "/jobs/estimate", tiny)
    assert quote["allowed_to_proceed"] is False and quote["budget"]["limit"] == "0.00"
    status, body = api("POST", "/jobs", tiny)
    assert status == 402 and _field(body) == "estimate.total"
    _nothing_stored(tenants)


def test_a_job_cancelled_while_running_pays_at_least_the_minimum(tenants, api, sagemaker):
    from shared.pricing import price_table
    from tests.conftest import deliver

    from .conftest import launch, stored

    status, job = api("POST", "/jobs", train(train_steps=1, seq_len=16))
    assert status == 201
    launch(job["job_id"])
    deliver(tenants, job["job_id"], "InProgress", "Stopped")
    assert stored(tenants, job["job_id"])["bill"] == str(price_table().minimum_charge_usd)


# --- path parameters --------------------------------------------------------------------------


def test_path_parameters_are_measured_after_url_decoding(tenants, api):
    for path, limit in (("/jobs/{}", 64), ("/jobs/{}/cancel", 64), ("/datasets/{}", 64), ("/models/{}", 128)):
        method = "POST" if path.endswith("cancel") else "GET"
        status, body = api(method, path.format("%C3%A9" * limit))
        assert status == 404, body  # `limit` characters: within the limit, and no such thing
        status, body = api(method, path.format("%C3%A9" * (limit + 1)))
        assert status == 422 and _field(body).endswith("_id") and "at most" in body["error"]["details"][0]["message"]
        assert api(method, path.format("x%2Fy"))[0] == 404  # a slash inside a parameter is no path


# --- malformed SageMaker events ---------------------------------------------------------------


def _running(tenants, api) -> dict:
    from tests.conftest import deliver

    from .conftest import launch

    status, job = api("POST", "/jobs", train())
    assert status == 201 and launch(job["job_id"]) == []
    deliver(tenants, job["job_id"], "InProgress")
    return job


def _handle(event: dict) -> dict:
    from functions.events import app as events
    from tests.conftest import LambdaContext

    return events.lambda_handler(event, LambdaContext())


def test_malformed_state_changes_are_ignored_and_the_job_still_ends(tenants, api, sagemaker):
    from tests.conftest import deliver, sagemaker_event, write_metrics

    from .conftest import stored

    job = _running(tenants, api)
    good = sagemaker_event(tenants, job["job_id"], "Completed")
    name = good["detail"]["TrainingJobName"]
    for detail in ({**good["detail"], "TrainingJobName": 5}, {**good["detail"], "TrainingJobName": [name]},
                   {**good["detail"], "TrainingJobStatus": ["Completed"]}, {**good["detail"], "TrainingJobStatus": 7},
                   {**good["detail"], "TrainingJobStatus": {"x": 1}}, {"TrainingJobName": None}, [name], None, "x", 5):
        assert _handle({**good, "detail": detail}) == {"changed": False}, detail
    assert _handle({"detail-type": "SageMaker Training Job State Change"}) == {"changed": False}
    assert stored(tenants, job["job_id"])["status"] == "running"
    write_metrics(tenants, stored(tenants, job["job_id"]))
    deliver(tenants, job["job_id"], "Completed")
    assert stored(tenants, job["job_id"])["status"] == "completed"


def test_completed_with_bad_artifacts_ends_failed_with_the_reason_or_completes(tenants, api, sagemaker):
    from tests.conftest import sagemaker_event, write_metrics

    from .conftest import stored

    null, missing_bucket, not_a_uri, bad_tokens = (_running(tenants, api) for _ in range(4))
    write_metrics(tenants, stored(tenants, null["job_id"]))  # where SageMaker writes it by default
    write_metrics(tenants, stored(tenants, bad_tokens["job_id"]), tokens="x")
    cases = {null["job_id"]: None, missing_bucket["job_id"]: {"S3ModelArtifacts": "s3://no-such-bucket/x/model.tar.gz"},
             not_a_uri["job_id"]: {"S3ModelArtifacts": 5}, bad_tokens["job_id"]: {}}
    for job_id, artifacts in cases.items():
        event = sagemaker_event(tenants, job_id, "Completed")
        _handle({**event, "detail": {**event["detail"], "ModelArtifacts": artifacts}})
    assert stored(tenants, null["job_id"])["status"] == "completed"
    for job in (missing_bucket, not_a_uri, bad_tokens):
        ended = stored(tenants, job["job_id"])
        assert ended["status"] == "failed" and "metrics.json could not be read" in ended["failure_reason"], ended
        assert ended["bill"] == "0.00"


def test_stopped_with_unreadable_progress_is_cancelled_billed_for_what_is_proven(tenants, api, sagemaker):
    from shared.pricing import Estimate, bill
    from tests.conftest import deliver

    from .conftest import stored

    for body in (b"{not json", b"[1, 2]", json.dumps({"tokens_trained": "x"}).encode(),
                 json.dumps({"tokens_trained": True}).encode(), json.dumps({"tokens_trained": -5}).encode(),
                 b"[" * 100_000):
        job = _running(tenants, api)
        tenants.session.client("s3").put_object(Bucket=tenants.env["ARTIFACTS_BUCKET"],
                                                Key=f"jobs/{job['job_id']}/checkpoints/progress.json", Body=body)
        deliver(tenants, job["job_id"], "Stopped")
        ended = stored(tenants, job["job_id"])
        assert ended["status"] == "cancelled", body
        assert ended["bill"] == str(bill(Estimate.model_validate(ended["estimate"]), 0))
        assert api("GET", f"/jobs/{job['job_id']}")[0] == 200


def test_failed_with_a_reason_of_the_wrong_type_still_fails_with_a_reason(tenants, api, sagemaker):
    from tests.conftest import sagemaker_event

    from .conftest import stored

    job = _running(tenants, api)
    event = sagemaker_event(tenants, job["job_id"], "Failed")
    _handle({**event, "detail": {**event["detail"], "FailureReason": {"nested": 1}, "SecondaryStatus": ["x"]}})
    ended = stored(tenants, job["job_id"])
    assert ended["status"] == "failed" and ended["failure_reason"] == "SageMaker reported the job failed"


def test_the_spec_declares_the_bearer_scheme_for_every_operation(aws, api):
    status, spec = api("GET", "/openapi.json")
    assert status == 200
    (name, scheme), = spec["components"]["securitySchemes"].items()
    assert (scheme["type"], scheme["scheme"], scheme["bearerFormat"]) == ("http", "bearer", "JWT")
    assert spec["security"] == [{name: []}]
    assert "/openapi.json" not in spec["paths"] and len(spec["paths"]) >= 6
