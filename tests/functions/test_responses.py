"""/openapi.json documents every response body with its model, and the API's real answers keep to it."""

from __future__ import annotations

import pytest
from jsonschema import Draft202012Validator

from shared.budgets import Budget, default_budget, quote
from shared.contracts import EvalRecord, StepRecord
from shared.outputs import metrics_log_key, progress_key, read_metrics_log
from shared.responses import CatalogModel, Curve, Job, Quote
from shared.store import Catalog, Jobs, base_model, now
from shared.training_jobs import training_job_name
from tests.conftest import deliver, progress_document, write_metrics

DATASET = "ds-aaaaaaaaaaaa"


@pytest.fixture
def spec(aws, api):
    status, spec = api("GET", "/openapi.json")
    assert status == 200
    return spec


def _schema(spec: dict, method: str, path: str, status: int) -> dict:
    response = spec["paths"][path][method.lower()]["responses"][str(status)]
    return {**response["content"]["application/json"]["schema"], "components": spec["components"]}


def _undocumented(body, schema: dict, spec: dict, where: str = "") -> list[str]:
    """The keys of a body that its schema does not name (an object of free form names none)."""
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    for option in schema.get("anyOf", ()):
        if Draft202012Validator({**option, "components": spec["components"]}).is_valid(body):
            return _undocumented(body, option, spec, where)
    if isinstance(body, dict) and "properties" in schema:
        return [f"{where}.{key}" for key in body if key not in schema["properties"]] + [
            miss for key, value in body.items() if key in schema["properties"]
            for miss in _undocumented(value, schema["properties"][key], spec, f"{where}.{key}")]
    if isinstance(body, list) and "items" in schema:
        return [miss for i, item in enumerate(body) for miss in _undocumented(item, schema["items"], spec, f"{where}[{i}]")]
    return []


def test_every_response_of_every_operation_has_a_real_schema(spec):
    components = spec["components"]["schemas"]
    seen = 0
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                schema = response["content"]["application/json"]["schema"]
                name = schema.get("$ref", "").rsplit("/", 1)[-1]
                assert name in components and components[name]["properties"], (method, path, status, schema)
                assert (name == "ErrorResponse") == (status >= "400"), (method, path, status, name)
                seen += 1
    assert seen > 3 * len(spec["paths"])
    assert set(components["Job"]["required"]) >= {"job_id", "status", "estimate", "bill"}
    assert components["Estimate"]["properties"]["total"]["type"] == "string"  # money is a decimal string


def test_real_answers_keep_to_the_documented_schema(aws, api, spec):
    ddb, bucket = aws.session.client("dynamodb"), aws.env["DATA_BUCKET"]
    ddb.put_item(TableName=aws.env["DATASETS_TABLE"], Item={
        "dataset_id": {"S": DATASET}, "owner": {"S": "alice"}, "status": {"S": "ready"}, "name": {"S": "d"},
        "s3_uri": {"S": f"s3://{bucket}/alice/datasets/{DATASET}/data.jsonl"}, "created_at": {"S": "2026-01-01T00:00:00Z"}})
    answers: list[tuple[str, str, int, object]] = []

    def call(method: str, path: str, body=None, *, route: str | None = None, query: str = "", expect: int = 200):
        status, answer = api(method, path, body, query=query)
        assert status == expect, (method, path, answer)
        answers.append((method, route or path, status, answer))
        return answer

    train = {"type": "train", "model": "base-debug", "dataset": DATASET, "hyperparams": {"steps_per_cycle": 100}}
    call("POST", "/jobs/estimate", train)
    call("POST", "/jobs", train, query="dry_run=true")
    job = call("POST", "/jobs", train, expect=201)
    route = "/jobs/{job_id}"
    job_id = job["job_id"]
    stored = Jobs(session=aws.session).get(job_id)
    internal = {"dataset_uri", "dataset_pin", "input_model_uri", "artifact_uri", "published_status",  # for launching
                "trials"}  # a tuning's (GET /tunings/{id} shows them)
    assert set(stored) - set(job) <= internal
    Jobs(session=aws.session).transition(job_id, "running", training_job_name=training_job_name(job_id))
    s3 = aws.session.client("s3")
    s3.put_object(Bucket=aws.env["ARTIFACTS_BUCKET"], Key=progress_key(job_id),
                  Body=progress_document(job_id, tokens_trained=3 * 256, step=3))
    logged = (StepRecord(kind="step", step=1, turn=1, cycle=1, loss=5.0, lr=1e-4, time=now()),
              EvalRecord(kind="eval", step=100, turn=1, cycle=1, steps=100, loss=4.2, heldout_loss=4.0,
                         perplexity=54.6, tokens=25600, time=now()))
    s3.put_object(Bucket=aws.env["ARTIFACTS_BUCKET"], Key=metrics_log_key(job_id),
                  Body="\n".join(r.model_dump_json() for r in logged))
    assert call("GET", f"/jobs/{job_id}", route=route)["progress"]["step"] == 3
    assert call("GET", f"/jobs/{job_id}/metrics", route=route + "/metrics")["logged_steps"] == 1
    write_metrics(aws, job)
    deliver(aws, job_id, "Completed")
    finished = call("GET", f"/jobs/{job_id}", route=route)
    assert finished["status"] == "completed"
    model_id = finished["output_model_id"]
    catalog = Catalog(session=aws.session)
    assert set(catalog.get(model_id, "alice")) <= set(call("GET", f"/models/{model_id}", route="/models/{model_id}"))
    call("GET", "/models/base-debug/download", route="/models/{model_id}/download")
    call("GET", "/models")
    call("POST", "/models/uploads", {"files": [{"name": "config.json", "bytes": 2}]}, expect=201)
    folder = call("POST", "/models", {"name": "mine", "uri": f"s3://{bucket}/alice/folder/"}, expect=201)
    assert folder["status"] == "rejected" and set(catalog.get(folder["model_id"], "alice")) <= set(folder)
    other = call("POST", "/jobs", train, expect=201)
    call("POST", f"/jobs/{other['job_id']}/cancel", route=route + "/cancel")
    call("GET", "/jobs")
    dataset = call("POST", "/datasets", {"name": "notes", "format": "text"}, expect=201)
    call("GET", f"/datasets/{dataset['dataset_id']}", route="/datasets/{dataset_id}")
    call("GET", "/datasets")
    call("DELETE", f"/datasets/{dataset['dataset_id']}", route="/datasets/{dataset_id}")
    generate = "/models/{model_id}/generate"
    from local.resources import pseudo_parameters
    from shared import serving
    from tests.functions.test_api import _endpoint, _endpoint_answers

    stack = pseudo_parameters("us-east-1")["AWS::StackName"]
    _endpoint(aws, serving.endpoint_name(model_id), [{"Key": serving.STACK_TAG, "Value": stack}])
    _endpoint_answers([{"generated_text": " there"}])
    call("POST", f"/models/{model_id}/generate", {"prompt": "Hi"}, route=generate)
    call("DELETE", f"/models/{model_id}", route="/models/{model_id}")
    call("POST", f"/jobs/{job_id}/cancel", route=route + "/cancel", expect=409)
    call("GET", "/jobs/nope", route=route, expect=404)
    call("POST", "/jobs", {"type": "train"}, expect=422)

    tuning_body = {"model": "base-debug", "dataset": DATASET, "max_trials": 2,
                   "settings": {"seq_len": 64, "steps_per_cycle": 100}, "ranges": {"lr": {"min": 1e-4, "max": 1e-3}}}
    troute = "/tunings/{tuning_id}"
    call("POST", "/tunings", tuning_body, query="dry_run=true")
    tuning = call("POST", "/tunings", tuning_body, expect=201)
    cancelled = call("POST", "/tunings", tuning_body, expect=201)
    call("POST", f"/tunings/{cancelled['tuning_id']}/cancel", route=troute + "/cancel")
    trial = {"name": f"fusion-{tuning['tuning_id']}-001-aaaaaaaa", "status": "completed", "early_stopped": False,
             "settings": {"lr": 3e-4}, "perplexity": 30.0, "curve": [40.0, 30.0], "tokens_trained": 640, "cost": "0.000256"}
    Jobs(session=aws.session).transition(tuning["tuning_id"], "completed", bill="0.01", trials=__import__("json").dumps([trial]))
    assert call("GET", f"/tunings/{tuning['tuning_id']}", route=troute)["trials"][0]["full_run"]["total"]
    call("GET", "/tunings")
    call("POST", f"/tunings/{tuning['tuning_id']}/promote", {}, route=troute + "/promote", expect=201)
    call("POST", "/tunings", {**tuning_body, "ranges": {"lr": {"min": 1e-3, "max": 1e-4}}}, expect=422)

    for method, path, status, answer in answers:
        schema = _schema(spec, method, path, status)
        errors = [e.message for e in Draft202012Validator(schema).iter_errors(answer)]
        assert not errors, (method, path, status, errors)
        assert not _undocumented(answer, schema, spec), (method, path, status)
    assert {(m, p) for m, p, _, _ in answers} >= {
        (method.upper(), path) for path, ops in spec["paths"].items() for method in ops}


def test_the_response_models_name_every_field_the_domain_answers_with(aws):
    """Response models drop what they do not name: every field the domain puts in an answer is named."""
    assert set(base_model("base-debug", artifacts_bucket="b")) <= set(CatalogModel.model_fields)
    budget = Budget(limit=default_budget(), spent=default_budget())
    job = {"type": "train", "model": "m", "dataset": "d", "settings": {}, "warnings": [],
           "estimate": {"total": "1.00"}}
    assert set(quote(job, budget)) == set(Quote.model_fields)
    curve = read_metrics_log(aws.session.client("s3"), aws.env["ARTIFACTS_BUCKET"], "j1")
    assert set(curve) | {"status"} == set(Curve.model_fields)
