"""Pipelines by events only: train -> registered -> contract requested -> contracted; and domain
events that are published at least once when the bus fails after a state write."""

from __future__ import annotations

import pytest

from functions.events import app as events
from shared.events import Bus
from shared.state_changes import model_id_for
from shared.store import Catalog, Jobs

from tests.conftest import GROWN, LambdaContext, deliver, write_metrics

from .conftest import dataset_id, launch, stored


def _requested(detail, event_id):
    event = {"version": "0", "id": event_id, "detail-type": "Fusion Job Requested", "source": "pipeline.nightly",
             "account": "123456789012", "time": "2026-01-01T00:00:00Z", "region": "us-east-1", "resources": [],
             "detail": detail}
    return events.lambda_handler(event, LambdaContext())


def _contract_on_registration(registered: dict) -> dict:
    """What a user's pipeline rule does: contract every model as soon as it is registered."""
    return {"owner": registered["owner"],
            "request": {"type": "contract", "hyperparams": {"source_model_id": registered["model_id"],
                                                            "num_layers_to_contract": 2, "output_name": "small"}}}


def test_train_then_contract_purely_by_events(tenants, sagemaker, observer):
    result = _requested({"owner": "alice", "request": {"type": "train", "model": "base-debug",
                                                       "dataset": dataset_id("alice")}}, "evt-train")
    assert result["accepted"] is True
    train_id = result["job_id"]
    assert launch(train_id) == []
    write_metrics(tenants, stored(tenants, train_id))
    deliver(tenants, train_id, "InProgress", "Completed")
    [registered] = [d for t, d in observer() if t == "Fusion Model Registered"]
    assert registered["owner"] == "alice" and registered["job_id"] == train_id

    result = _requested(_contract_on_registration(registered), "evt-contract")
    assert result["accepted"] is True
    contract = stored(tenants, result["job_id"])
    assert contract["type"] == "contract" and contract["model"] == registered["model_id"]
    assert contract["dataset"] == dataset_id("alice")  # the source model's own dataset, for calibration
    assert launch(contract["job_id"]) == []
    smaller = GROWN.model_copy(update={"layers": GROWN.layers[:3], "block_ids": GROWN.ids()[:3]})
    write_metrics(tenants, contract, config=smaller, tokens=0, perplexity=30.0)
    deliver(tenants, contract["job_id"], "Completed")
    model = Catalog(session=tenants.session).get(model_id_for(contract["job_id"]), "alice")
    assert model["kind"] == "contracted" and model["parent_id"] == registered["model_id"] and model["name"] == "small"
    assert [d["model_id"] for t, d in observer() if t == "Fusion Model Registered"] == [model["model_id"]]


def test_requested_jobs_get_the_same_tenancy_and_budget(tenants, observer, monkeypatch):
    other = {"type": "contract", "hyperparams": {"source_model_id": "m-bob", "num_layers_to_contract": 1}}
    assert _requested({"owner": "alice", "request": other}, "e1")["error"]["code"] == "model_not_found"
    uri = f"s3://{tenants.env['DATA_BUCKET']}/bob/data.jsonl"
    stolen = {"type": "train", "model": "base-debug", "dataset": uri}
    assert _requested({"owner": "alice", "request": stolen}, "e2")["error"]["details"][0]["field"] == "dataset"
    monkeypatch.setenv("FUSION_DEFAULT_BUDGET_USD", "0.10")
    own = {"type": "train", "model": "base-debug", "dataset": dataset_id("alice")}
    assert _requested({"owner": "alice", "request": own}, "e3")["error"]["code"] == "budget_exceeded"
    assert Jobs(session=tenants.session).list("alice") == []
    assert [t for t, _ in observer()] == ["Fusion Job Rejected"] * 3


class FlakyBus(Bus):
    """Refuses the next `failures` publishes, as EventBridge does when throttled or unreachable."""

    failures = 0

    def publish(self, detail_type, detail):
        if FlakyBus.failures:
            FlakyBus.failures -= 1
            raise RuntimeError("EventBridge unavailable")
        super().publish(detail_type, detail)


@pytest.fixture
def flaky(aws, monkeypatch):
    clients = events._clients()
    monkeypatch.setitem(clients, "bus", FlakyBus())
    return FlakyBus


def test_a_publish_that_fails_after_the_state_write_is_retried_without_a_second_change(tenants, sagemaker,
                                                                                         observer, flaky):
    result = _requested({"owner": "alice", "request": {"type": "train", "model": "base-debug",
                                                       "dataset": dataset_id("alice")}}, "evt-1")
    job_id = result["job_id"]
    launch(job_id)
    write_metrics(tenants, stored(tenants, job_id))
    observer()
    flaky.failures = 1
    with pytest.raises(RuntimeError):
        deliver(tenants, job_id, "Completed")  # written, then the bus failed: EventBridge retries it
    job = stored(tenants, job_id)
    assert job["status"] == "completed" and job["published_status"] != "completed" and observer() == []
    updated = job["updated_at"]
    deliver(tenants, job_id, "Completed")  # the retry
    assert [t for t, _ in observer()] == ["Fusion Job State Change", "Fusion Model Registered"]
    deliver(tenants, job_id, "Completed")  # a duplicate after that publishes nothing more
    assert observer() == []
    assert stored(tenants, job_id)["bill"] == job["bill"] and stored(tenants, job_id)["status"] == "completed"
    assert len([m for m in Catalog(session=tenants.session).list("alice") if m["kind"] == "trained"]) == 2  # m-alice + new
    assert updated <= stored(tenants, job_id)["updated_at"]


def test_a_requested_job_whose_announcement_failed_is_not_created_twice(tenants, observer, flaky):
    request = {"owner": "alice", "request": {"type": "train", "model": "base-debug", "dataset": dataset_id("alice")}}
    flaky.failures = 1
    with pytest.raises(RuntimeError):
        _requested(request, "evt-same")
    again = _requested(request, "evt-same")  # EventBridge redelivers the same event (same id)
    assert again["accepted"] is True
    assert [j["job_id"] for j in Jobs(session=tenants.session).list("alice")] == [again["job_id"]]
    assert [(t, d["status"]) for t, d in observer()] == [("Fusion Job State Change", "queued")]
    sqs = tenants.session.client("sqs")
    assert len(sqs.receive_message(QueueUrl=tenants.env["LAUNCH_QUEUE_URL"], MaxNumberOfMessages=10)["Messages"]) == 1
