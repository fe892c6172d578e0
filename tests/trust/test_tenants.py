"""Tenancy: the JWT sub is the tenant in every route; another tenant's things are 404."""

from __future__ import annotations

import pytest

from shared.store import Jobs
from shared.tenancy import PUBLIC_OWNER
from tests.conftest import http, unsigned_jwt

from .conftest import dataset_id, ready_dataset, stored, train


def _create(api, owner, body=None):
    status, job = api("POST", "/jobs", body or train(owner), tenant=owner)
    assert status == 201, job
    return job


def test_a_job_is_owned_by_the_sub_claim(tenants, api):
    job = _create(api, "alice")
    assert job["owner"] == "alice" and Jobs(session=tenants.session).get(job["job_id"])["owner"] == "alice"


@pytest.mark.parametrize("method, path", [("GET", "/jobs/{}"), ("POST", "/jobs/{}/cancel")])
def test_another_tenants_job_is_404_in_every_job_route(tenants, api, sagemaker, method, path):
    job = _create(api, "alice")
    status, body = api(method, path.format(job["job_id"]), tenant="bob")
    assert status == 404 and body["error"]["code"] == "job_not_found"
    assert api("GET", "/jobs", tenant="bob")[1]["jobs"] == []
    assert [j["job_id"] for j in api("GET", "/jobs", tenant="alice")[1]["jobs"]] == [job["job_id"]]
    assert api("GET", f"/jobs/{job['job_id']}", tenant="alice")[1]["status"] == "queued"  # bob's cancel did nothing


def test_another_tenants_model_is_404_to_read_and_to_contract(tenants, api):
    assert api("GET", "/models/m-alice", tenant="bob")[0] == 404
    assert {m["model_id"] for m in api("GET", "/models", tenant="bob")[1]["models"]} >= {"m-bob", "base-debug"}
    assert "m-alice" not in {m["model_id"] for m in api("GET", "/models", tenant="bob")[1]["models"]}
    contract = {"type": "contract", "hyperparams": {"source_model_id": "m-alice", "num_layers_to_contract": 1}}
    for path in ("/jobs", "/jobs/estimate"):
        status, body = api("POST", path, contract, tenant="bob")
        assert status == 404 and body["error"]["details"][0]["field"] == "hyperparams.source_model_id"
    assert api("POST", "/jobs", contract, tenant="alice")[0] == 201


def test_base_models_are_public_and_read_only(tenants, api):
    for owner in ("alice", "bob", "carol"):
        status, model = api("GET", "/models/base-debug", tenant=owner)
        assert status == 200 and model["owner"] == PUBLIC_OWNER and model["kind"] == "base"
    # Read-only: the one route that writes the catalog registers a folder of the caller's under a
    # new id; it takes no model id to overwrite. And a base model is no one's to contract.
    status, body = api("POST", "/models", {"model_id": "base-debug"}, tenant="alice")
    assert status == 422 and {d["field"] for d in body["error"]["details"]} >= {"model_id"}
    assert api("GET", "/models/base-debug", tenant="bob")[1]["owner"] == PUBLIC_OWNER
    contract = {"type": "contract", "dataset": dataset_id("alice"),
                "hyperparams": {"source_model_id": "base-debug", "num_layers_to_contract": 1}}
    status, body = api("POST", "/jobs", contract, tenant="alice")
    assert status == 422 and "is a base model" in body["error"]["details"][0]["message"]


def test_another_tenants_dataset_is_404_by_id_and_in_lists(tenants, api):
    status, body = api("POST", "/jobs", {**train("alice"), "dataset": dataset_id("bob")}, tenant="alice")
    assert status == 404 and body["error"]["details"][0]["field"] == "dataset"
    assert api("GET", f"/datasets/{dataset_id('bob')}", tenant="alice")[0] == 404
    assert api("GET", "/datasets", tenant="alice")[0] == 200


@pytest.mark.parametrize("uri", [
    "s3://{data}/bob/datasets/x/data.jsonl",           # another tenant's prefix
    "s3://{data}/alicex/data.jsonl",                   # a prefix that only starts like the tenant
    "s3://{data}/alice/../bob/data.jsonl",             # climbing out of the prefix
    "s3://{data}/alice/",                              # the whole prefix root is no dataset
    "s3://{artifacts}/jobs/j0/output/model.tar.gz",    # another bucket of ours
    "s3://someone-elses-bucket/alice/data.jsonl",      # a bucket that is not ours
    "s3:/{data}/alice/x", "https://{data}.s3.amazonaws.com/alice/x", "file:///etc/passwd",
])
def test_only_the_tenants_own_data_prefix_is_accepted(tenants, api, uri):
    uri = uri.format(data=tenants.env["DATA_BUCKET"], artifacts=tenants.env["ARTIFACTS_BUCKET"])
    status, body = api("POST", "/jobs", {**train("alice"), "dataset": uri}, tenant="alice")
    assert status in (404, 422) and body["error"]["details"][0]["field"] == "dataset"
    assert Jobs(session=tenants.session).list("alice") == []


def test_an_uploaded_datasets_uri_is_its_id_and_any_other_uri_is_refused(tenants, api):
    """An s3:// URI is admitted only as the upload of one of the caller's ready datasets (checked and
    pinned like its id); any other object, even in the caller's own prefix, was never checked."""
    data = tenants.env["DATA_BUCKET"]
    uri = f"s3://{data}/alice/datasets/{dataset_id('alice')}/data.jsonl"
    job = _create(api, "alice", {**train("alice"), "dataset": uri})
    assert job["dataset"] == uri
    assert stored(tenants, job["job_id"])["dataset_uri"] == uri
    for unchecked in (f"s3://{data}/alice/corpus/part-0.jsonl", f"s3://{data}/alice/datasets/ds-000000000000/data.jsonl",
                      f"s3://{data}/alice/datasets/{dataset_id('alice')}/data.txt",
                      f"s3://{data}/alice/./datasets/{dataset_id('alice')}/data.jsonl"):
        status, body = api("POST", "/jobs", {**train("alice"), "dataset": unchecked}, tenant="alice")
        assert status in (404, 422) and body["error"]["details"][0]["field"] == "dataset", (unchecked, body)
    assert len(Jobs(session=tenants.session).list("alice")) == 1


def test_local_server_passes_unsigned_token_claims_on_as_the_tenant(tenants, server):
    status, job = http(f"{server}/jobs", "POST", train("bob"), token=unsigned_jwt({"sub": "bob", "aud": "x"}))
    assert status == 201 and job["owner"] == "bob"
    assert http(f"{server}/jobs/{job['job_id']}", token=unsigned_jwt({"sub": "alice"}))[0] == 404
    assert http(f"{server}/jobs/{job['job_id']}", token=unsigned_jwt({"sub": "bob"}))[0] == 200
    assert http(f"{server}/jobs/{job['job_id']}")[0] == 404  # no token: tenant "local"


def test_local_server_without_a_token_is_tenant_local(tenants, server):
    status, body = http(f"{server}/jobs", "POST", train("alice"))
    assert status == 404 and body["error"]["details"][0]["field"] == "dataset"  # alice's dataset, not local's
    status, job = http(f"{server}/jobs", "POST", {**train(), "dataset": ready_dataset(tenants, "local")})
    assert status == 201 and job["owner"] == "local"


def test_local_server_refuses_a_token_without_sub(tenants, server):
    status, body = http(f"{server}/jobs", token=unsigned_jwt({"aud": "x"}))
    assert status == 401 and "sub" in body["error"]["message"]
