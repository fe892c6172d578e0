"""The reconciler: a job whose every SageMaker event was lost ends as the events would have ended it."""

from __future__ import annotations

import pytest

from functions.launcher import app as launcher
from functions.reconciler import app as reconciler
from shared.state_changes import model_id_for
from shared.store import Catalog, Tenants, cents
from shared.training_jobs import training_job_name
from tests.conftest import REGION, LambdaContext, deliver, write_metrics
from tests.trust.conftest import launch, reports_uncompressed_model, stored, train, write_progress

# What differs between two jobs however alike: their ids, times, and the names derived from the id.
PER_JOB = {"job_id", "created_at", "updated_at", "training_job_name", "output_model_id", "artifact_uri",
           "dataset_uri", "model_id", "settings"}
END = {"Completed": "completed", "Stopped": "cancelled", "Failed": "failed"}


@pytest.fixture
def moto_sagemaker(aws):
    """The launcher on moto's SageMaker (through boto3, so its calls meet the launcher's role)."""
    from moto.sagemaker.models import sagemaker_backends

    launcher._clients.cache_clear()
    reconciler._clients.cache_clear()
    yield sagemaker_backends["123456789012"][REGION]
    launcher._clients.cache_clear()
    reconciler._clients.cache_clear()


def _set(backend, job_id: str, status: str, reason: str | None = None) -> None:
    training_job = backend.training_jobs[training_job_name(job_id)]
    training_job.training_job_status = training_job.secondary_status = status
    reports_uncompressed_model(training_job)
    if reason:
        training_job.failure_reason = reason


def _same(job: dict) -> dict:
    return {k: v for k, v in job.items() if k not in PER_JOB}


def _model(aws, job: dict) -> dict | None:
    model = Catalog(session=aws.session).get(model_id_for(job["job_id"]), job["owner"])
    return None if model is None else {k: v for k, v in model.items() if k not in PER_JOB | {"name", "job_id"}}


@pytest.mark.parametrize("end", sorted(END))
def test_a_job_whose_events_were_all_dropped_ends_with_the_same_job_model_and_bill(tenants, api, moto_sagemaker, end):
    followed, dropped = (api("POST", "/jobs", train(train_steps=20))[1]["job_id"] for _ in range(2))
    assert launch(followed, dropped) == []
    reason = "AlgorithmError: out of memory" if end == "Failed" else None
    for job_id in (followed, dropped):
        _set(moto_sagemaker, job_id, "InProgress")
        if end == "Completed":
            write_metrics(tenants, stored(tenants, job_id), tokens=1234)
        if end == "Stopped":
            write_progress(tenants, job_id, 640)
    spent_before = Tenants(session=tenants.session).get("alice")["spent_cents"]

    deliver(tenants, followed, "InProgress", end, reason=reason)
    for job_id in (followed, dropped):
        _set(moto_sagemaker, job_id, end, reason)
    assert stored(tenants, dropped)["status"] == "launching"  # nothing arrived for it
    summary = reconciler.lambda_handler({}, LambdaContext())

    assert summary["moved"] == [dropped] and summary["errors"] == 0
    by_events, by_reconciler = stored(tenants, followed), stored(tenants, dropped)
    assert by_reconciler["status"] == END[end]
    assert _same(by_reconciler) == _same(by_events)
    assert by_reconciler["bill"] == by_events["bill"]
    assert _model(tenants, by_reconciler) == _model(tenants, by_events)
    assert (_model(tenants, by_events) is not None) == (end == "Completed")
    # Each job's estimate left the tenant's spend and its bill went in, once for each.
    spent = Tenants(session=tenants.session).get("alice")["spent_cents"]
    estimate = cents(by_events["estimate"]["total"])
    assert spent == spent_before - 2 * estimate + 2 * cents(by_events["bill"])
    # A second pass finds nothing left to do.
    assert reconciler.lambda_handler({}, LambdaContext())["moved"] == []


def test_a_job_not_created_yet_and_one_in_agreement_are_left_alone(tenants, api, moto_sagemaker):
    queued = api("POST", "/jobs", train())[1]["job_id"]
    running = api("POST", "/jobs", train())[1]["job_id"]
    assert launch(running) == []
    _set(moto_sagemaker, running, "InProgress")
    deliver(tenants, running, "InProgress")
    tenants.session.client("dynamodb").update_item(  # launching, but its training job not created yet
        TableName=tenants.env["JOBS_TABLE"], Key={"job_id": {"S": queued}}, UpdateExpression="SET #s = :l",
        ExpressionAttributeNames={"#s": "status"}, ExpressionAttributeValues={":l": {"S": "launching"}})
    summary = reconciler.lambda_handler({}, LambdaContext())
    assert summary == {"checked": 2, "moved": [], "not_created": 1, "errors": 0, "unlaunched": []}
    assert stored(tenants, running)["status"] == "running" and stored(tenants, queued)["status"] == "launching"


def _age(aws, job_id: str, seconds: float, status: str | None = None) -> None:
    """Backdate the job's last change (and set its status, as the launcher would have)."""
    from datetime import datetime, timedelta, timezone

    then = (datetime.now(timezone.utc) - timedelta(seconds=seconds)).isoformat(timespec="milliseconds")
    names, values, update = {"#u": "updated_at"}, {":u": {"S": then.replace("+00:00", "Z")}}, "SET #u = :u"
    if status:
        names["#s"], values[":s"], update = "status", {"S": status}, update + ", #s = :s"
    aws.session.client("dynamodb").update_item(TableName=aws.env["JOBS_TABLE"], Key={"job_id": {"S": job_id}},
                                                UpdateExpression=update, ExpressionAttributeNames=names,
                                                ExpressionAttributeValues=values)


def test_a_job_never_launched_stops_holding_its_estimate_once_its_message_cannot_be_delivered(
        tenants, api, moto_sagemaker):
    from shared.state_changes import UNLAUNCHED_AFTER_SECONDS

    old_queued, old_launching, new_queued, new_launching = (api("POST", "/jobs", train())[1]["job_id"] for _ in range(4))
    spent_before = Tenants(session=tenants.session).get("alice")["spent_cents"]
    _age(tenants, old_queued, UNLAUNCHED_AFTER_SECONDS + 60)
    _age(tenants, old_launching, UNLAUNCHED_AFTER_SECONDS + 60, "launching")  # its message was dead-lettered
    _age(tenants, new_queued, UNLAUNCHED_AFTER_SECONDS - 600)
    _age(tenants, new_launching, UNLAUNCHED_AFTER_SECONDS - 600, "launching")
    summary = reconciler.lambda_handler({}, LambdaContext())
    assert sorted(summary["unlaunched"]) == sorted([old_queued, old_launching]) and summary["errors"] == 0
    for job_id in (old_queued, old_launching):
        job = stored(tenants, job_id)
        assert job["status"] == "failed" and job["bill"] == "0.00"
        assert job["failure_reason"].startswith("never launched") and "nothing was billed" in job["failure_reason"]
    assert stored(tenants, new_queued)["status"] == "queued"
    assert stored(tenants, new_launching)["status"] == "launching"
    estimate = cents(stored(tenants, old_queued)["estimate"]["total"])
    assert Tenants(session=tenants.session).get("alice")["spent_cents"] == spent_before - 2 * estimate
    # A second pass, and a late launch of one of them, change nothing.
    assert reconciler.lambda_handler({}, LambdaContext())["unlaunched"] == []
    assert launch(old_queued) == [] and stored(tenants, old_queued)["status"] == "failed"
    assert Tenants(session=tenants.session).get("alice")["spent_cents"] == spent_before - 2 * estimate


def test_the_unlaunched_limit_outlasts_every_delivery_of_a_launch_message():
    from local.resources import load_template
    from shared.state_changes import UNLAUNCHED_AFTER_SECONDS

    queue = load_template()["Resources"]["LaunchQueue"]["Properties"]
    assert UNLAUNCHED_AFTER_SECONDS > queue["RedrivePolicy"]["maxReceiveCount"] * queue["VisibilityTimeout"]
