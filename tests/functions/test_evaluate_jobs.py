"""An evaluate job through the functions: priced and admitted by the API, launched with one input
channel per model, and its table recorded on the job when SageMaker reports it completed."""

import json
from decimal import Decimal

import pytest

from functions.launcher import app as launcher
from shared.contracts import EvaluateMetrics, Evaluated, HeldOut
from shared.pricing import Estimate, bill, estimate_evaluate, price_table
from shared.settings import MAX_EVALUATED_MODELS, EvaluateSettings
from shared.shapes import SIZES, grown_config
from shared.store import Catalog, Jobs
from shared.training_jobs import training_job_name
from tests.conftest import FakeSageMaker, LambdaContext, deliver, metrics_document, put_metrics, ready_dataset

GROWN = grown_config(SIZES["debug"])


@pytest.fixture
def world(aws):
    """alice owns a trained model m-alice; bob owns m-bob."""
    catalog = Catalog(session=aws.session)
    for model_id, owner in [("m-alice", "alice"), ("m-bob", "bob")]:
        catalog.register({
            "model_id": model_id, "owner": owner, "name": model_id, "kind": "trained", "parent_id": "base-debug",
            "job_id": "j0", "parameters": GROWN.parameters(), "depth": GROWN.n_layers, "perplexity": 20.0,
            "artifact_uri": f"s3://{aws.env['ARTIFACTS_BUCKET']}/jobs/j0/output/fusion-j0/output/model.tar.gz",
            "cost": "0.62", "config": GROWN.model_dump(mode="json"), "dataset": "ds-x", "created_at": "t"})
    return aws


def _evaluate(aws, **hyper):
    return {"type": "evaluate", "dataset": ready_dataset(aws, "alice"),
            "hyperparams": {"model_ids": ["m-alice", "base-debug"], **hyper}}


def test_an_evaluation_is_priced_by_its_forward_tokens(world, api):
    status, job = api("POST", "/jobs", _evaluate(world, seq_len=128, max_windows=100))
    assert status == 201 and job["type"] == "evaluate" and job["model"] is None
    assert job["models"] == ["m-alice", "base-debug"] and job["evaluation"] is None
    settings = EvaluateSettings(model_ids=["m-alice", "base-debug"], seq_len=128, max_windows=100)
    expected = estimate_evaluate(settings, [GROWN, SIZES["debug"]])
    estimate = job["estimate"]
    assert estimate["evaluated_tokens"] == 2 * 100 * 128 and estimate["training_tokens"] == 0
    rate = price_table().tier_for(GROWN.parameters()).usd_per_million_evaluated_tokens
    assert Decimal(estimate["evaluation_cost"]) == expected.evaluation_cost == Decimal(2 * 100 * 128) / 10**6 * rate
    assert Decimal(estimate["total"]) == max(expected.evaluation_cost.quantize(Decimal("0.01")),
                                             price_table().minimum_charge_usd)
    assert estimate["growth_fee"] == estimate["contraction_fee"] == "0"
    stored = Jobs(session=world.session).get(job["job_id"])
    assert stored["input_model_uris"][0].endswith("/jobs/j0/output/fusion-j0/output/model.tar.gz")
    assert stored["input_model_uris"][1].endswith("/base-models/debug/model.tar.gz")


@pytest.mark.parametrize("hyper, field, code", [
    ({"model_ids": ["m-bob"]}, "hyperparams.model_ids.0", 404),  # another tenant's model is no model of yours
    ({"model_ids": ["m-alice", "m-nope"]}, "hyperparams.model_ids.1", 404),
    ({"seq_len": 4096}, "hyperparams.seq_len", 422),  # past the debug model's context
    ({"model_ids": []}, "hyperparams.model_ids", 422),
    ({"model_ids": ["m-alice", "m-alice"]}, "hyperparams", 422),
    ({"model_ids": [f"m-{i}" for i in range(MAX_EVALUATED_MODELS + 1)]}, "hyperparams.model_ids", 422),
    ({"source": "validation"}, "hyperparams.source", 422),  # a train job's own: an evaluation names its dataset
    ({"max_windows": 0}, "hyperparams.max_windows", 422),
])
def test_a_bad_evaluation_is_refused_with_its_field(world, api, hyper, field, code):
    status, body = api("POST", "/jobs", _evaluate(world, **hyper))
    assert status == code, body
    assert field in [d["field"] for d in body["error"]["details"]]
    assert Jobs(session=world.session).list("alice") == []


def test_a_model_an_evaluation_still_reads_cannot_be_deleted(world, api):
    _, job = api("POST", "/jobs", _evaluate(world, seq_len=64))
    status, body = api("DELETE", "/models/m-alice")
    assert status == 409 and job["job_id"] in body["error"]["message"]
    assert Catalog(session=world.session).get("m-alice", "alice")["status"] == "ready"


def test_the_launch_gives_each_model_its_channel(world, api, monkeypatch):
    fake = FakeSageMaker()
    jobs, _, bus = launcher._clients()
    monkeypatch.setattr(launcher, "_clients", lambda: (jobs, fake, bus))
    _, job = api("POST", "/jobs", _evaluate(world, seq_len=64))
    message = {"Records": [{"messageId": "m", "receiptHandle": "r", "body": json.dumps({"job_id": job["job_id"]}),
                            "attributes": {"ApproximateReceiveCount": "1", "SentTimestamp": "0", "SenderId": "s",
                                           "ApproximateFirstReceiveTimestamp": "0"}, "messageAttributes": {},
                            "md5OfBody": "", "eventSource": "aws:sqs", "awsRegion": "us-east-1",
                            "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:fusion-LaunchQueue"}]}
    assert launcher.lambda_handler(message, LambdaContext())["batchItemFailures"] == []
    [request] = fake.created.values()
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in request["InputDataConfig"]}
    stored = Jobs(session=world.session).get(job["job_id"])
    assert channels == {"training": stored["dataset_uri"], "model-0": stored["input_model_uris"][0],
                        "model-1": stored["input_model_uris"][1]}
    hyper = request["HyperParameters"]
    assert (hyper["job_type"], json.loads(hyper["model_ids"]), hyper["seq_len"]) == ("evaluate", ["m-alice", "base-debug"], "64")


ON = HeldOut(source="split", windows=10, seq_len=64, tokens="assistant", sha256="ab" * 32)  # as the container writes it


def _metrics(job):
    rows = [Evaluated(model_id=m, parameters=1000, perplexity_on=ON, target_tokens=ON.windows * 20, loss=3.0 + i,
                      perplexity=20.0 + i) for i, m in enumerate(job["models"])]
    return EvaluateMetrics(job_id=job["job_id"], job_type="evaluate", rows=rows,
                           evaluated_tokens=len(rows) * ON.windows * ON.seq_len, wall_time_s=1.0)


def _complete(aws, job, metrics):
    jobs = Jobs(session=aws.session)
    jobs.transition(job["job_id"], "launching", training_job_name=training_job_name(job["job_id"]))
    put_metrics(aws, job["job_id"], metrics.model_dump_json().encode())
    deliver(aws, job["job_id"], "InProgress", "Completed", "Completed")


def test_a_completed_evaluation_records_its_table_and_registers_no_model(world, api):
    _, job = api("POST", "/jobs", _evaluate(world, seq_len=64, max_windows=20))
    metrics = _metrics(job)  # the dataset held 10 windows: half of what was priced
    _complete(world, job, metrics)
    status, shown = api("GET", f"/jobs/{job['job_id']}")
    assert status == 200 and shown["status"] == "completed" and shown["output_model_id"] is None
    table = shown["evaluation"]
    assert [(r["model_id"], r["perplexity"], r["target_tokens"]) for r in table["rows"]] == [
        ("m-alice", 20.0, 200), ("base-debug", 21.0, 200)]
    # Each row names its windows as the catalog names a perplexity's, the dataset filled in.
    for row in table["rows"]:
        assert row["perplexity_on"] == {**ON.model_dump(), "dataset": job["dataset"]}
    assert table["evaluated_tokens"] == metrics.evaluated_tokens
    estimate = Estimate.model_validate(job["estimate"])
    assert Decimal(shown["bill"]) == bill(estimate, 0, metrics.evaluated_tokens) <= Decimal(job["estimate"]["total"])
    assert {m["model_id"] for m in Catalog(session=world.session).list("alice") if m["kind"] != "base"} == {"m-alice"}


def test_metrics_of_another_job_type_fail_the_evaluation(world, api):
    _, job = api("POST", "/jobs", _evaluate(world, seq_len=64))
    document = metrics_document({**job, "type": "train", "estimate": {"training_tokens": 0}})
    jobs = Jobs(session=world.session)
    jobs.transition(job["job_id"], "launching", training_job_name=training_job_name(job["job_id"]))
    put_metrics(world, job["job_id"], json.dumps(document).encode())
    deliver(world, job["job_id"], "Completed")
    stored = jobs.get(job["job_id"])
    assert stored["status"] == "failed" and "a train job's" in stored["failure_reason"] and stored["bill"] == "0.00"
