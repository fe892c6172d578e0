"""Stores against moto tables built from template.yaml: tenancy, forward-only status, register once."""

import time

import pytest

from shared.store import Catalog, ConditionFailed, Jobs, base_model, seed_base_models
from shared.tenancy import PUBLIC_OWNER
from shared.shapes import SIZES


def _job(job_id="j1", owner="alice", status="queued", created_at="2026-01-01T00:00:00.000Z"):
    return {"job_id": job_id, "owner": owner, "status": status, "type": "train", "created_at": created_at,
            "updated_at": created_at, "settings": {"turns": 1, "lr": 1e-4}, "estimate": {"total": "0.62"}}


def test_job_round_trips_with_floats_and_nested_settings(aws):
    jobs = Jobs(session=aws.session)
    jobs.create(_job())
    got = jobs.get("j1")
    assert got["settings"] == {"turns": 1, "lr": 1e-4}
    assert got["estimate"] == {"total": "0.62"}
    assert got["status"] == "queued"


def test_create_never_overwrites(aws):
    jobs = Jobs(session=aws.session)
    jobs.create(_job())
    with pytest.raises(ConditionFailed):
        jobs.create(_job(status="running"))
    assert jobs.get("j1")["status"] == "queued"


def test_other_tenants_do_not_see_a_job(aws):
    jobs = Jobs(session=aws.session)
    jobs.create(_job())
    assert jobs.get("j1", "alice") is not None
    assert jobs.get("j1", "mallory") is None
    assert jobs.list("mallory") == []


def test_list_is_per_owner_newest_first(aws):
    jobs = Jobs(session=aws.session)
    jobs.create(_job("a", created_at="2026-01-01T00:00:00.000Z"))
    jobs.create(_job("b", created_at="2026-01-02T00:00:00.000Z"))
    jobs.create(_job("c", owner="bob"))
    assert [j["job_id"] for j in jobs.list("alice")] == ["b", "a"]


@pytest.mark.parametrize("path, blocked", [
    (["launching", "running", "completed"], ["running", "launching", "queued", "failed", "cancelled"]),
    (["running", "failed"], ["completed", "cancelled", "running"]),
    (["cancelling", "cancelled"], ["running", "completed", "cancelling"]),
])
def test_transitions_only_move_forward(aws, path, blocked):
    jobs = Jobs(session=aws.session)
    jobs.create(_job())
    for status in path:
        assert jobs.transition("j1", status)["status"] == status
    for status in blocked:
        with pytest.raises(ConditionFailed):
            jobs.transition("j1", status, bill="9.99")
    assert jobs.get("j1")["status"] == path[-1]
    assert jobs.get("j1")["bill"] is None


def test_transition_of_a_missing_job_fails(aws):
    with pytest.raises(ConditionFailed):
        Jobs(session=aws.session).transition("nope", "running")


def test_base_models_are_public_and_seeded(aws):
    catalog = Catalog(session=aws.session)
    listed = {m["model_id"] for m in catalog.list("anyone")}
    assert listed == {f"base-{size}" for size in SIZES}
    model = catalog.get("base-debug", "anyone")
    assert model["owner"] == PUBLIC_OWNER and model["depth"] == SIZES["debug"].n_layers
    assert model["artifact_uri"] == f"s3://{aws.env['ARTIFACTS_BUCKET']}/base-models/debug/model.tar.gz"
    assert set(seed_base_models(catalog, artifacts_bucket=aws.env["ARTIFACTS_BUCKET"])) == listed  # idempotent
    assert base_model("base-nope", artifacts_bucket="b") is None


def test_register_once_and_tenancy(aws):
    catalog = Catalog(session=aws.session)
    model = {"model_id": "m-1", "owner": "alice", "name": "n", "kind": "trained", "created_at": "t",
             "job_id": "j1", "perplexity": 12.5, "config": {"dim": 64}}
    assert catalog.register(model) is True
    assert catalog.register({**model, "name": "other"}) is False
    assert catalog.get("m-1", "alice")["name"] == "n"
    assert catalog.get("m-1", "alice")["perplexity"] == 12.5
    assert catalog.get("m-1", "bob") is None
    assert "m-1" not in {m["model_id"] for m in catalog.list("bob")}


def test_datasets_are_per_owner_newest_first_and_a_ready_one_stays_pinned(aws):
    from shared.datasets import CreateDatasetRequest, register
    from shared.store import Datasets

    datasets = Datasets(session=aws.session)
    first = register(datasets, "alice", CreateDatasetRequest(name="a"), "data")
    time.sleep(0.005)  # created_at counts milliseconds
    second = register(datasets, "alice", CreateDatasetRequest(name="b", format="text"), "data")
    assert second["s3_uri"] == f"s3://data/alice/datasets/{second['dataset_id']}/data.txt"
    assert [d["dataset_id"] for d in datasets.list("alice")] == [second["dataset_id"], first["dataset_id"]]
    assert datasets.get(first["dataset_id"], "bob") is None and datasets.list("bob") == []
    check = {"ok": True, "bytes_read": 10, "tokens": 3000, "reason": None}
    assert not datasets.record_check(first["dataset_id"], "bob", **check, etag='"e1"')
    assert datasets.record_check(first["dataset_id"], "alice", **check, etag='"e1"')
    assert not datasets.record_check(first["dataset_id"], "alice", **check, etag='"e2"')  # ready: pinned
    got = datasets.get(first["dataset_id"], "alice")
    assert (got["status"], got["bytes"], got["tokens"], got["s3_etag"]) == ("ready", 10, 3000, '"e1"')


def test_jobs_in_flight_are_read_from_the_status_index_not_the_whole_table(aws):
    """The reconciler's read examines only the jobs launching, running or cancelling, however many
    have ended (a scan examined every job)."""
    from shared.lifecycle import ACTIVE_STATUSES, STATUS_RANK

    jobs = Jobs(session=aws.session)
    statuses = list(STATUS_RANK)
    for i in range(3 * len(statuses)):
        jobs.create(_job(job_id=f"j{i}", status=statuses[i % len(statuses)]))
    examined, query = [], jobs.client.query

    def counting(**kwargs):
        response = query(**kwargs)
        examined.append(response["ScannedCount"])
        return response

    jobs.client.query = counting
    found = jobs.in_flight()
    active = {f"j{i}" for i in range(3 * len(statuses)) if statuses[i % len(statuses)] in ACTIVE_STATUSES}
    assert {j["job_id"] for j in found} == active and len(found) == len(active) == 3 * len(ACTIVE_STATUSES)
    assert all(j["status"] in ACTIVE_STATUSES for j in found)
    assert sum(examined) == len(active) < 3 * len(statuses)
