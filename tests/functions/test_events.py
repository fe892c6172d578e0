"""SageMaker state-change events, hand-written as EventBridge delivers them, in any order and twice."""

import itertools
import json
from decimal import Decimal

import pytest
from botocore.exceptions import ClientError

from functions.events import app as events
from shared import state_changes
from shared.admission import resolve
from shared.outputs import progress_key, read_metrics
from shared.pricing import Estimate, bill
from shared.settings import JOB_REQUEST
from shared.state_changes import model_id_for
from shared.store import Catalog, Datasets, Jobs
from shared.training_jobs import training_job_name
from tests.conftest import (GROWN, HELDOUT, LambdaContext, artifact, deliver, metrics_document, progress_document,
                            ready_dataset, sagemaker_event, write_metrics)


def _submit(aws, body):
    job = resolve(JOB_REQUEST.validate_python(body), "alice", catalog=Catalog(session=aws.session),
                  datasets=Datasets(session=aws.session), data_bucket=aws.env["DATA_BUCKET"], s3=aws.session.client("s3"))
    jobs = Jobs(session=aws.session)
    jobs.create(job)
    jobs.transition(job["job_id"], "launching", training_job_name=training_job_name(job["job_id"]))
    return job


@pytest.fixture
def job(aws):
    return _submit(aws, {"type": "train", "model": "base-debug", "dataset": ready_dataset(aws, "alice"),
                         "hyperparams": {"steps_per_cycle": 100, "output_name": "support-bot"}})


def _state(aws, job_id):
    job = Jobs(session=aws.session).get(job_id)
    models = [m for m in Catalog(session=aws.session).list("alice") if m["kind"] != "base"]
    return job["status"], job["bill"], job["output_model_id"], job["failure_reason"], models


def test_a_completed_job_registers_its_model(aws, job, observer):
    write_metrics(aws, job)
    deliver(aws, job["job_id"], "InProgress", "Completed")
    status, billed, model_id, _, [model] = _state(aws, job["job_id"])
    assert status == "completed" and billed == job["estimate"]["total"]
    assert model_id == model["model_id"] == model_id_for(job["job_id"])
    assert model["name"] == "support-bot" and model["kind"] == "trained" and model["owner"] == "alice"
    assert model["parent_id"] == "base-debug" and model["job_id"] == job["job_id"]
    assert model["parameters"] == GROWN.parameters() and model["depth"] == GROWN.n_layers
    assert model["perplexity"] == 17.5 and model["cost"] == billed
    assert model["artifact_uri"] == artifact(aws, job["job_id"])
    assert model["config"] == GROWN.model_dump(mode="json") and model["dataset"] == job["dataset"]
    # The perplexity names its dataset, windows and seq_len; a trained model has no parent figure.
    assert model["perplexity_on"] == {**HELDOUT.model_dump(), "dataset": job["dataset"]}
    assert model["parent_perplexity"] is None
    published = observer()
    assert [(t, d.get("status")) for t, d in published] == [
        ("Fusion Job State Change", "running"), ("Fusion Job State Change", "completed"),
        ("Fusion Model Registered", None)]
    assert published[2][1]["model_id"] == model_id


@pytest.mark.parametrize("reported", ["as it is", "without its final slash", "missing"])
def test_a_completed_job_records_its_uncompressed_model_prefix_and_reads_metrics_there(aws, job, reported):
    """SageMaker uploads the model uncompressed: the catalog and the job keep the prefix output/model/
    (ending in "/", whatever SageMaker's answer ends in, or where it names none), and metrics.json is
    read from that prefix, no archive being there."""
    prefix = artifact(aws, job["job_id"])
    assert prefix.endswith(f"/jobs/{job['job_id']}/output/{training_job_name(job['job_id'])}/output/model/")
    write_metrics(aws, job, perplexity=12.25)
    event = sagemaker_event(aws, job["job_id"], "Completed")
    if reported == "missing":
        del event["detail"]["ModelArtifacts"]
    elif reported == "without its final slash":
        event["detail"]["ModelArtifacts"]["S3ModelArtifacts"] = prefix.rstrip("/")
    events.lambda_handler(event, LambdaContext())
    status, _, _, _, [model] = _state(aws, job["job_id"])
    assert status == "completed" and model["perplexity"] == 12.25
    assert model["artifact_uri"] == prefix == Jobs(session=aws.session).get(job["job_id"])["artifact_uri"]
    listed = aws.session.client("s3").list_objects_v2(Bucket=aws.env["ARTIFACTS_BUCKET"], Prefix=f"jobs/{job['job_id']}/")
    assert not any(o["Key"].endswith(".tar.gz") for o in listed["Contents"])


ORDERS = sorted(set(itertools.permutations(["InProgress", "Completed", "Completed", "InProgress"])))


@pytest.mark.parametrize("order", ORDERS, ids=["-".join(o) for o in ORDERS])
def test_duplicated_and_reordered_events_end_the_same(aws, job, observer, order):
    write_metrics(aws, job)
    deliver(aws, job["job_id"], *order)
    status, billed, model_id, _, models = _state(aws, job["job_id"])
    assert (status, billed, len(models)) == ("completed", job["estimate"]["total"], 1)
    assert [t for t, _ in observer()].count("Fusion Model Registered") == 1


def test_a_stopped_job_is_billed_for_the_tokens_it_trained(aws, job):
    tokens = job["estimate"]["training_tokens"] // 3
    aws.session.client("s3").put_object(Bucket=aws.env["ARTIFACTS_BUCKET"],
                                        Key=progress_key(job['job_id']),
                                        Body=progress_document(job["job_id"], tokens, step=200))
    write_metrics(aws, job)
    deliver(aws, job["job_id"], "InProgress", "Stopping", "Stopped", "Completed", "Stopped")
    status, billed, model_id, _, models = _state(aws, job["job_id"])
    expected = bill(Estimate.model_validate(job["estimate"]), tokens)
    assert status == "cancelled" and Decimal(billed) == expected and expected < Decimal(job["estimate"]["total"])
    assert model_id is None and models == []
    assert Jobs(session=aws.session).get(job["job_id"])["stopped"] == {"step": 200, "total_steps": 200}


def test_a_stopped_job_without_progress_pays_only_its_fees(aws, job):
    deliver(aws, job["job_id"], "Stopped")
    assert _state(aws, job["job_id"])[1] == str(bill(Estimate.model_validate(job["estimate"]), 0))


def test_a_failed_job_keeps_sagemakers_reason(aws, job, observer):
    write_metrics(aws, job)
    deliver(aws, job["job_id"], "Failed", "InProgress", "Completed", reason="AlgorithmError: CUDA out of memory")
    status, billed, model_id, reason, models = _state(aws, job["job_id"])
    assert (status, billed, model_id, models) == ("failed", "0.00", None, [])
    assert reason == "AlgorithmError: CUDA out of memory"
    assert [(t, d["status"]) for t, d in observer()] == [("Fusion Job State Change", "failed")]


def test_a_contract_job_registers_a_contracted_model(aws, job):
    write_metrics(aws, job)
    deliver(aws, job["job_id"], "Completed")
    source_id = model_id_for(job["job_id"])
    contract = _submit(aws, {"type": "contract", "hyperparams": {"source_model_id": source_id,
                                                                "num_layers_to_contract": 2}})
    smaller = GROWN.model_copy(update={"layers": GROWN.layers[:3], "block_ids": GROWN.ids()[:3]})
    write_metrics(aws, contract, config=smaller, tokens=0, perplexity=25.0, parent_perplexity=21.0)
    deliver(aws, contract["job_id"], "Completed")
    model = Catalog(session=aws.session).get(model_id_for(contract["job_id"]), "alice")
    assert model["kind"] == "contracted" and model["parent_id"] == source_id and model["depth"] == 3
    assert model["cost"] == contract["estimate"]["total"] and model["dataset"] == job["dataset"]
    # Parent and child on the contract job's own windows, side by side (not the parent's catalog figure).
    assert (model["parent_perplexity"], model["perplexity"]) == (21.0, 25.0)
    assert model["perplexity_on"]["seq_len"] == HELDOUT.seq_len


def test_missing_metrics_fail_the_job_and_keep_theartifact(aws, job, observer):
    deliver(aws, job["job_id"], "Completed", "Completed")  # nothing to retry for: it would never appear
    status, billed, model_id, reason, models = _state(aws, job["job_id"])
    assert (status, billed, model_id, models) == ("failed", "0.00", None, [])
    assert "metrics.json could not be read" in reason and artifact(aws, job["job_id"]) in reason
    assert Jobs(session=aws.session).get(job["job_id"])["artifact_uri"] == artifact(aws, job["job_id"])
    assert [(t, d["status"]) for t, d in observer()] == [("Fusion Job State Change", "failed")]


@pytest.mark.parametrize("change, named", [
    ({"final_perplexity": None}, "final_perplexity: Field required"),
    ({"training_tokens": 1.5}, "training_tokens: Input should be a valid integer"),
    ({"job_type": "contract"}, "contract.layers_contracted: Field required"),
])
def test_metrics_off_the_contract_fail_the_job_with_the_field_named(aws, job, observer, change, named):
    document = {k: v for k, v in {**metrics_document(job), **change}.items() if v is not None}
    write_metrics(aws, job, document=document)
    deliver(aws, job["job_id"], "InProgress", "Completed")
    status, billed, model_id, reason, models = _state(aws, job["job_id"])
    assert (status, billed, model_id, models) == ("failed", "0.00", None, [])
    assert "metrics.json could not be read" in reason and named in reason, reason
    assert [(t, d["status"]) for t, d in observer()][-1] == ("Fusion Job State Change", "failed")


def test_a_transient_metrics_error_raises_so_the_event_is_retried(aws, job, monkeypatch):
    from botocore.exceptions import EndpointConnectionError

    write_metrics(aws, job)
    real = read_metrics

    def unreachable(s3, uri):
        raise EndpointConnectionError(endpoint_url="https://s3")

    monkeypatch.setattr(state_changes, "read_metrics", unreachable)
    with pytest.raises(EndpointConnectionError):
        deliver(aws, job["job_id"], "Completed")
    assert _state(aws, job["job_id"])[0] == "launching"
    monkeypatch.setattr(state_changes, "read_metrics", real)
    deliver(aws, job["job_id"], "Completed")  # the retry succeeds
    assert _state(aws, job["job_id"])[0] == "completed"


@pytest.mark.parametrize("name", ["other-job", "fusion-no-such-job", "fusion-UPPER"])
def test_events_of_other_training_jobs_are_ignored(aws, job, name):
    event = sagemaker_event(aws, job["job_id"], "Failed")
    event["detail"]["TrainingJobName"] = name
    assert events.lambda_handler(event, LambdaContext()) == {"changed": False}
    assert _state(aws, job["job_id"])[0] == "launching"


def _requested(detail):
    event = {"version": "0", "id": "r", "detail-type": "Fusion Job Requested", "source": "pipeline.nightly",
             "account": "123456789012", "time": "2026-01-01T00:00:00Z", "region": "us-east-1", "resources": [],
             "detail": detail}
    return events.lambda_handler(event, LambdaContext())


def test_a_requested_job_is_validated_priced_and_queued(aws, observer):
    request = {"type": "train", "model": "base-debug", "dataset": ready_dataset(aws, "alice")}
    result = _requested({"owner": "alice", "request": request})
    assert result["accepted"] is True
    job = Jobs(session=aws.session).get(result["job_id"], "alice")
    assert job["status"] == "queued" and job["estimate"]["total"] == "0.62"
    sqs = aws.session.client("sqs")
    [message] = sqs.receive_message(QueueUrl=aws.env["LAUNCH_QUEUE_URL"])["Messages"]
    assert json.loads(message["Body"]) == {"job_id": result["job_id"]}
    assert [(t, d["status"]) for t, d in observer()] == [("Fusion Job State Change", "queued")]


@pytest.mark.parametrize("detail, field", [
    ({"owner": "alice", "request": {"type": "train", "model": "base-debug", "dataset": "ds-x",
                                    "hyperparams": {"turns": 0}}}, "hyperparams.turns"),
    ({"owner": "alice", "request": {"type": "train", "model": "base-nope", "dataset": "ds-x"}}, "model"),
    ({"request": {"type": "train", "model": "base-debug", "dataset": "ds-x"}}, "owner"),
    ({"owner": "alice", "request": "train please"}, "body"),
])
def test_a_refused_request_is_answered_on_the_bus(aws, observer, detail, field):
    result = _requested(detail)
    assert result["accepted"] is False
    assert field in {d["field"] for d in result["error"]["details"]}
    [(kind, published)] = observer()
    assert kind == "Fusion Job Rejected" and published["error"] == result["error"]
    assert Jobs(session=aws.session).list("alice") == []


def test_a_job_stopped_at_its_runtime_limit_failed_and_pays_nothing(aws, job):
    event = sagemaker_event(aws, job["job_id"], "Stopped")
    event["detail"]["SecondaryStatus"] = "MaxRuntimeExceeded"
    events.lambda_handler(event, LambdaContext())
    status, billed, _, reason, _ = _state(aws, job["job_id"])
    assert (status, billed) == ("failed", "0.00") and "MaxRuntimeExceeded" in reason
