"""A dataset is pinned when checked: the check records the object it read, a later upload never
changes a ready dataset, and a job is launched only on the checked object, or refused."""

from __future__ import annotations

import json

from functions.datasets import app as check
from shared.datasets import EMPTY_REASON
from shared.store import REPLACED_REASON, Tenants
from tests.conftest import LambdaContext

from .conftest import launch, stored, train

GOOD = b"".join(json.dumps({"text": f"record {i} about training small models"}).encode() + b"\n" for i in range(400))
OTHER = GOOD.replace(b"training", b"poisoned")


def _register(api) -> dict:
    status, created = api("POST", "/datasets", {"name": "d", "format": "jsonl"})
    assert status == 201, created
    return created


def _put(aws, dataset: dict, body: bytes) -> dict:
    key = dataset["s3_uri"].split("/", 3)[3]
    put = aws.session.client("s3").put_object(Bucket=aws.env["DATA_BUCKET"], Key=key, Body=body)
    return {"key": key, "versionId": put.get("VersionId"), "eTag": put["ETag"].strip('"'), "size": len(body)}


def _notify(aws, obj: dict) -> dict:
    """The data bucket's ObjectCreated notification for one uploaded version, as S3 sends it."""
    record = {"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
              "s3": {"bucket": {"name": aws.env["DATA_BUCKET"]}, "object": obj}}
    return check.lambda_handler({"Records": [record]}, LambdaContext())


def test_a_second_upload_never_replaces_a_ready_dataset_and_its_jobs_are_refused(tenants, api, sagemaker):
    dataset = _register(api)
    first = _put(tenants, dataset, GOOD)
    assert first["versionId"]  # the data bucket is versioned, here as in the template
    assert _notify(tenants, first) == {"checked": [dataset["dataset_id"]]}
    ready = api("GET", f"/datasets/{dataset['dataset_id']}")[1]
    assert ready["status"] == "ready" and ready["bytes"] == len(GOOD)

    status, queued = api("POST", "/jobs", {**train(), "dataset": dataset["dataset_id"]})
    assert status == 201
    second = _put(tenants, dataset, OTHER)  # the presigned URL still works within its hour
    # At once, before its notification is handled: admission sees the object is not the checked one.
    status, body = api("POST", "/jobs", {**train(), "dataset": dataset["dataset_id"]})
    assert status == 422 and "replaced after its check" in body["error"]["details"][0]["message"]
    assert _notify(tenants, second) == {"checked": [dataset["dataset_id"]]}
    assert _notify(tenants, second) == {"checked": []}  # a repeated notification changes nothing twice
    shown = api("GET", f"/datasets/{dataset['dataset_id']}")[1]
    assert shown == {**ready, "status": "replaced", "reason": REPLACED_REASON}  # never ready on the new bytes
    for path in ("/jobs", "/jobs/estimate"):
        status, body = api("POST", path, {**train(), "dataset": dataset["dataset_id"]})
        assert status == 422 and "replaced" in body["error"]["details"][0]["message"], body
    assert _notify(tenants, _put(tenants, dataset, GOOD)) == {"checked": []}  # even the bytes first checked
    assert api("GET", f"/datasets/{dataset['dataset_id']}")[1]["status"] == "replaced"

    assert launch(queued["job_id"]) == []
    job = stored(tenants, queued["job_id"])
    assert job["status"] == "failed" and "replaced after its check" in job["failure_reason"]
    assert job["bill"] == "0.00" and sagemaker.created == {}
    assert int(Tenants(session=tenants.session).get("alice")["spent_cents"]) == 0


def test_the_check_judges_the_version_it_was_notified_of(tenants, api, sagemaker):
    dataset = _register(api)
    first = _put(tenants, dataset, GOOD)
    _put(tenants, dataset, b"not json\n")  # lands before the first notification is handled
    assert _notify(tenants, first) == {"checked": [dataset["dataset_id"]]}
    assert api("GET", f"/datasets/{dataset['dataset_id']}")[1]["status"] == "ready"
    status, body = api("POST", "/jobs", {**train(), "dataset": dataset["dataset_id"]})
    assert status == 422 and "replaced after its check" in body["error"]["details"][0]["message"]
    assert sagemaker.created == {}


def test_an_unchanged_dataset_launches_and_a_rejected_one_may_be_uploaded_again(tenants, api, sagemaker):
    dataset = _register(api)
    assert _notify(tenants, _put(tenants, dataset, b"not json\n")) == {"checked": [dataset["dataset_id"]]}
    assert api("GET", f"/datasets/{dataset['dataset_id']}")[1]["status"] == "rejected"
    assert _notify(tenants, _put(tenants, dataset, GOOD)) == {"checked": [dataset["dataset_id"]]}
    assert api("GET", f"/datasets/{dataset['dataset_id']}")[1]["status"] == "ready"
    status, queued = api("POST", "/jobs", {**train(), "dataset": dataset["dataset_id"]})
    assert launch(queued["job_id"]) == []
    assert stored(tenants, queued["job_id"])["status"] == "launching"
    assert f"fusion-{queued['job_id']}" in sagemaker.created


def test_a_deleted_dataset_object_refuses_its_job(tenants, api, sagemaker):
    dataset = _register(api)
    obj = _put(tenants, dataset, GOOD)
    _notify(tenants, obj)
    status, queued = api("POST", "/jobs", {**train(), "dataset": dataset["dataset_id"]})
    tenants.session.client("s3").delete_object(Bucket=tenants.env["DATA_BUCKET"], Key=obj["key"])
    assert launch(queued["job_id"]) == []
    job = stored(tenants, queued["job_id"])
    assert job["status"] == "failed" and "deleted after its check" in job["failure_reason"]


def test_a_zero_byte_dataset_says_so(tenants, api):
    for fmt in ("jsonl", "text"):
        status, dataset = api("POST", "/datasets", {"name": "empty", "format": fmt})
        _notify(tenants, _put(tenants, dataset, b""))
        shown = api("GET", f"/datasets/{dataset['dataset_id']}")[1]
        assert shown["status"] == "rejected" and shown["reason"] == EMPTY_REASON and "0 bytes" in EMPTY_REASON
