"""Hostile input: every refusal is a 4xx naming its field (or a clean no-op), never a 500, and a
refused request leaves no record and no spend."""

from __future__ import annotations

import itertools
import json

import pytest

from functions.api.body import MAX_DEPTH
from shared.outputs import progress_key
from shared.settings import MAX_HEALING_STEPS, MAX_LAYERS, MAX_STEPS_PER_TURN
from shared.store import Tenants
from tests.conftest import LambdaContext

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
                                                Key=progress_key(job['job_id']), Body=body)
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


# --- uploads: every check ends, ready or rejected (or failed, naming the error), never pending ---------


def _upload_and_check(aws, api, body: bytes, fmt: str = "jsonl") -> dict:
    from functions.datasets import app as check

    status, created = api("POST", "/datasets", {"name": "up", "format": fmt})
    assert status == 201, created
    key = created["s3_uri"].split("/", 3)[3]
    put = aws.session.client("s3").put_object(Bucket=aws.env["DATA_BUCKET"], Key=key, Body=body)
    record = {"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
              "s3": {"bucket": {"name": aws.env["DATA_BUCKET"]},
                     "object": {"key": key, "size": len(body), "versionId": put.get("VersionId")}}}
    assert check.lambda_handler({"Records": [record]}, LambdaContext()) == {"checked": [created["dataset_id"]]}
    return api("GET", f"/datasets/{created['dataset_id']}")[1]


GOOD_LINE = json.dumps({"text": "a sentence about small models and their training " * 4}).encode() + b"\n"
GOOD_JSONL = GOOD_LINE * 200


@pytest.mark.parametrize("case, line, words", [
    ("5,000-digit integer", b'{"text": "x", "n": 1' + b"0" * 5000 + b"}\n", "line 201 is not JSON we can read"),
    ("nested 100,000 deep", b'{"text": "x", "n": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", "line 201 nests"),
    ("UTF-16-BE line", json.dumps({"text": "hello there"}).encode("utf-16-be") + b"\n", "line 201 is not UTF-8"),
    ("UTF-16-LE with BOM", json.dumps({"text": "hello there"}).encode("utf-16") + b"\n", "line 201 is not UTF-8"),
    ("encoded surrogate", b'{"text": "a \xed\xa0\x80 b"}\n', "line 201 is not UTF-8"),
    ("NaN", b'{"text": "x", "n": NaN}\n', None),
    ("a JSON string, not an object", b'"text"\n', 'line 201 has no string "text" field'),
])
def test_any_line_ends_the_check_with_a_reason_that_names_it(tenants, api, case, line, words):
    """Precision: none (bytes in, a verdict out)."""
    shown = _upload_and_check(tenants, api, GOOD_JSONL + line + GOOD_JSONL)
    if words is None:  # NaN is what json reads; a valid record that holds it passes
        assert shown["status"] == "ready", shown
        return
    assert shown["status"] == "rejected" and words in shown["reason"], (case, shown)
    assert shown["bytes"] == len(GOOD_JSONL + line + GOOD_JSONL)


def test_a_whole_utf16_file_is_rejected_not_detected(tenants, api):
    body = "".join(json.dumps({"text": f"record {i} " * 20}) + "\n" for i in range(300))
    for encoding in ("utf-16-be", "utf-16-le", "utf-32", "utf-16"):
        shown = _upload_and_check(tenants, api, body.encode(encoding))
        assert shown["status"] == "rejected" and "line 1 is not UTF-8" in shown["reason"], (encoding, shown)
    assert _upload_and_check(tenants, api, b"\xef\xbb\xbf" + body.encode())["status"] == "ready"  # a UTF-8 BOM is fine


def test_an_overlong_line_is_rejected_before_it_is_held(tenants, api, monkeypatch):
    from shared import datasets

    monkeypatch.setattr(datasets, "MAX_LINE_BYTES", 4096)
    shown = _upload_and_check(tenants, api, GOOD_JSONL + b'{"text": "' + b"a" * 10_000 + b'"}\n' + GOOD_JSONL)
    assert shown["status"] == "rejected" and "line 201 is longer than 4096 bytes" in shown["reason"]


def test_a_rejected_datasets_bytes_are_the_files_size_not_how_far_the_check_read(tenants, api, monkeypatch):
    monkeypatch.setenv("DATASET_MAX_BYTES", str(1 << 20))
    body = GOOD_LINE * ((3 << 20) // len(GOOD_LINE))  # three limits' worth: the check stops after one
    shown = _upload_and_check(tenants, api, body)
    assert shown["status"] == "rejected" and "larger than the 1048576-byte limit" in shown["reason"]
    assert shown["bytes"] == len(body)


def test_a_check_that_breaks_ends_failed_naming_the_error_and_a_new_upload_rechecks(tenants, api, monkeypatch):
    from functions.datasets import app as check

    real, calls = check.check_dataset, []

    def breaks_once(chunks, fmt):
        calls.append(fmt)
        if len(calls) == 1:
            raise MemoryError("no room")
        return real(chunks, fmt)

    monkeypatch.setattr(check, "check_dataset", breaks_once)
    shown = _upload_and_check(tenants, api, GOOD_JSONL)
    assert shown["status"] == "failed" and "MemoryError: no room" in shown["reason"], shown
    status, body = api("POST", "/jobs", {**train(), "dataset": shown["dataset_id"]})
    assert status == 422 and "is failed" in body["error"]["details"][0]["message"]

    key = shown["s3_uri"].split("/", 3)[3]
    tenants.session.client("s3").put_object(Bucket=tenants.env["DATA_BUCKET"], Key=key, Body=GOOD_JSONL)
    record = {"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
              "s3": {"bucket": {"name": tenants.env["DATA_BUCKET"]}, "object": {"key": key, "size": 1}}}
    assert check.lambda_handler({"Records": [record]}, LambdaContext()) == {"checked": [shown["dataset_id"]]}
    assert api("GET", f"/datasets/{shown['dataset_id']}")[1]["status"] == "ready"
    status, body = api("POST", "/jobs", {**train(), "dataset": shown["dataset_id"]})
    assert status == 201, body


# --- contraction floor: a layer keeps 1 head and 1 MLP unit ---------------------------------------


def _contracted_model(aws, model_id: str, floor_layers: int) -> None:
    """A model of alice's whose first `floor_layers` layers are down to 1 head and 1 MLP unit (as
    repeated contractions leave them), the rest as grown."""
    from shared.shapes import LayerShape
    from shared.store import Catalog
    from tests.conftest import GROWN

    layers = [LayerShape(n_heads=1, n_kv_heads=1, mlp_hidden=1) if i < floor_layers else layer
              for i, layer in enumerate(GROWN.layers)]
    config = GROWN.model_copy(update={"layers": layers})
    Catalog(session=aws.session).register({
        "model_id": model_id, "owner": "alice", "name": model_id, "kind": "contracted", "parent_id": "m-alice",
        "job_id": "j1", "parameters": config.parameters(), "depth": config.n_layers, "perplexity": 30.0,
        "artifact_uri": f"s3://{aws.env['ARTIFACTS_BUCKET']}/jobs/j1/model.tar.gz", "cost": "1.00",
        "config": config.model_dump(mode="json"), "dataset": dataset_id("alice"), "created_at": "t"})


def test_a_contraction_that_would_remove_nothing_is_refused_and_less_than_asked_is_said(tenants, api):
    from tests.conftest import GROWN

    depth = GROWN.n_layers
    _contracted_model(tenants, "m-floor", depth)
    _contracted_model(tenants, "m-half", depth - 2)
    for path in ("/jobs", "/jobs/estimate"):
        status, body = api("POST", path, _contract(source_model_id="m-floor", contraction_ratio=0.9,
                                                   num_layers_to_contract=depth))
        assert status == 422 and _field(body) == "hyperparams.contraction_ratio", body
        assert "would remove nothing" in body["error"]["details"][0]["message"]
    status, quote = api("POST", "/jobs/estimate", _contract(source_model_id="m-half", contraction_ratio=0.5,
                                                            num_layers_to_contract=3))
    assert status == 200 and any("only 2 of the 3 layers" in w and "removes less than asked" in w
                                 for w in quote["warnings"]), quote
    status, quote = api("POST", "/jobs/estimate", _contract(contraction_ratio=0.5, num_layers_to_contract=3))
    # m-alice: every layer can lose what is asked; it is a grown model, and the one warning says what that removes
    assert status == 200 and [w for w in quote["warnings"] if "inserted by growth" not in w] == [], quote
    _nothing_stored_but_datasets(tenants)


def _nothing_stored_but_datasets(aws) -> None:
    assert aws.session.client("dynamodb").scan(TableName=aws.env["JOBS_TABLE"])["Items"] == []


# --- base models the deployment has not published ------------------------------------------------


def test_a_base_model_without_weights_is_listed_not_available_and_refused_at_admission(tenants, api):
    from shared.shapes import SIZES
    from tests.conftest import publish_base_archive

    models = {m["model_id"]: m for m in api("GET", "/models")[1]["models"]}
    assert models["base-debug"]["available"] is True  # the fixture published its archive
    unpublished = [f"base-{size}" for size in SIZES if size != "debug"]
    assert unpublished and all(models[m]["available"] is False for m in unpublished)
    for model_id in unpublished:
        for path in ("/jobs", "/jobs/estimate"):
            status, body = api("POST", path, {**train(), "model": model_id, "hyperparams": {"seq_len": 16}})
            assert status == 422 and _field(body) == "model" and model_id in body["error"]["details"][0]["message"]
            assert "not available" in body["error"]["details"][0]["message"]
        assert api("GET", f"/models/{model_id}")[1]["available"] is False
        status, body = api("GET", f"/models/{model_id}/download")
        assert status == 422 and "not available" in body["error"]["details"][0]["message"]
    _nothing_stored_but_datasets(tenants)
    size = unpublished[0].removeprefix("base-")
    publish_base_archive(tenants.session, tenants.env, size)  # the operator uploads it: available at once
    assert api("GET", f"/models/{unpublished[0]}")[1]["available"] is True


def test_a_requested_job_meets_the_same_availability_and_replacement_checks(tenants, api, observer):
    """The events function admits as POST /jobs does, under its own role: a base model not
    published, and a dataset whose object a second upload replaced, are refused on the bus."""
    from functions.events import app as events

    def requested(request: dict, event_id: str) -> dict:
        event = {"id": event_id, "detail-type": "Fusion Job Requested", "source": "pipeline",
                 "detail": {"owner": "alice", "request": request}}
        return events.lambda_handler(event, LambdaContext())

    answer = requested({**train(), "model": "base-small", "hyperparams": {"seq_len": 16}}, "e-small")
    assert answer["accepted"] is False and "base-small is not available" in answer["error"]["details"][0]["message"]
    shown = _upload_and_check(tenants, api, GOOD_JSONL)
    key = shown["s3_uri"].split("/", 3)[3]
    tenants.session.client("s3").put_object(Bucket=tenants.env["DATA_BUCKET"], Key=key, Body=GOOD_JSONL + GOOD_LINE)
    answer = requested({**train(), "dataset": shown["dataset_id"]}, "e-replaced")
    assert answer["accepted"] is False and "replaced after its check" in answer["error"]["details"][0]["message"]
    assert requested({**train(), "dataset": dataset_id("alice")}, "e-fine")["accepted"] is True
    assert [kind for kind, _ in observer()].count("Fusion Job Rejected") == 2
