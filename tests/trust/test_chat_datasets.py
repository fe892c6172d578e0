"""Conversation datasets and a validation set of the user's own, through the API, the dataset
check and the launcher: what the check answers, what the estimate warns of, and what the
training job is given."""

from __future__ import annotations

import json

from functions.datasets import app as check
from tests.conftest import LambdaContext

from .conftest import launch, stored, train

CHAT = b"".join(json.dumps({"messages": [
    {"role": "user", "content": f"How do I list the files of directory number {i}?"},
    {"role": "assistant", "content": f"Run ls on directory {i}; add -l for details such as sizes and owners."},
]}).encode() + b"\n" for i in range(120)) + json.dumps({"prompt": "Say it all.", "completion": "all " * 150}).encode()


def _ready(aws, api, body: bytes) -> dict:
    status, dataset = api("POST", "/datasets", {"name": "chat", "format": "jsonl"})
    assert status == 201, dataset
    key = dataset["s3_uri"].split("/", 3)[3]
    put = aws.session.client("s3").put_object(Bucket=aws.env["DATA_BUCKET"], Key=key, Body=body)
    record = {"eventSource": "aws:s3", "eventName": "ObjectCreated:Put", "s3": {
        "bucket": {"name": aws.env["DATA_BUCKET"]},
        "object": {"key": key, "versionId": put.get("VersionId"), "eTag": put["ETag"].strip('"'), "size": len(body)}}}
    assert check.lambda_handler({"Records": [record]}, LambdaContext()) == {"checked": [dataset["dataset_id"]]}
    return api("GET", f"/datasets/{dataset['dataset_id']}")[1]


def test_the_check_answers_with_the_conversations_figures_and_the_estimate_warns_of_cuts(tenants, api, sagemaker):
    dataset = _ready(tenants, api, CHAT)
    assert dataset["status"] == "ready", dataset
    chat = dataset["chat"]
    assert chat["examples"] == 121 and 0.3 < chat["assistant_share"] < 0.8
    assert sum(chat["lengths"].values()) == 121

    status, quote = api("POST", "/jobs/estimate", {**train(seq_len=128), "dataset": dataset["dataset_id"]})
    assert status == 200, quote
    assert any(w.startswith("1 of the 121 conversations are longer than seq_len=128") for w in quote["warnings"])
    status, quote = api("POST", "/jobs/estimate", {**train(seq_len=256), "dataset": dataset["dataset_id"]})
    assert not any("conversations" in w for w in quote["warnings"])


def test_a_validation_set_is_its_own_channel_and_is_pinned_like_the_data(tenants, api, sagemaker):
    data, validation = _ready(tenants, api, CHAT), _ready(tenants, api, CHAT)
    body = {**train(), "dataset": data["dataset_id"], "validation_dataset": validation["dataset_id"]}
    status, job = api("POST", "/jobs", body)
    assert status == 201, job
    assert job["validation_dataset"] == validation["dataset_id"]
    assert launch(job["job_id"]) == []
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"]
                for c in sagemaker.created[f"fusion-{job['job_id']}"]["InputDataConfig"]}
    assert channels["validation"] == validation["s3_uri"] and channels["training"] == data["s3_uri"]

    # A second upload to the validation set after its check: the job is refused, not run on it.
    status, second = api("POST", "/jobs", body)
    key = validation["s3_uri"].split("/", 3)[3]
    tenants.session.client("s3").put_object(Bucket=tenants.env["DATA_BUCKET"], Key=key, Body=b"{}\n")
    assert launch(second["job_id"]) == []
    failed = stored(tenants, second["job_id"])
    assert failed["status"] == "failed" and "replaced after its check" in failed["failure_reason"]


def test_a_validation_set_that_is_not_ready_or_not_yours_is_refused_by_name(tenants, api, sagemaker):
    status, error = api("POST", "/jobs", {**train(), "validation_dataset": "ds-nonexistent0"})
    assert status == 404 and error["error"]["details"][0]["field"] == "validation_dataset"
    status, error = api("POST", "/jobs", {**train(), "validation_dataset": "s3://elsewhere/x.jsonl"})
    assert status == 422 and error["error"]["details"][0]["field"] == "validation_dataset"
    status, error = api("POST", "/jobs", {**train(), "validation_dataset": "ds-bbbbbbbbbbbb"}, tenant="alice")
    assert status == 404  # bob's
