"""Dataset routes and the upload check, against moto."""

from __future__ import annotations

import json
import os

import boto3
import pytest

from functions.api import context as api_context
from functions.api import datasets as routes
from functions.datasets import app as check_function
from shared.datasets import check_dataset, parse_dataset_key
from tests.conftest import LambdaContext


@pytest.fixture
def aws(aws):
    """The shared moto stack; the dataset routes and check cache their clients, so each case starts afresh."""
    _forget_clients()
    yield aws
    _forget_clients()


def _forget_clients() -> None:
    routes._s3.cache_clear(), check_function._clients.cache_clear()
    api_context.reset()


def _bucket() -> str:
    return os.environ["DATA_BUCKET"]


def _upload(key: str, data: bytes) -> None:
    boto3.client("s3").put_object(Bucket=_bucket(), Key=key, Body=data)


def _s3_event(key: str) -> dict:
    return {"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
                         "s3": {"bucket": {"name": _bucket()}, "object": {"key": key, "size": 1}}}]}


def _jsonl(records: int) -> bytes:
    return b"".join(json.dumps({"text": f"record {i} says something about fusion training " * 3}).encode() + b"\n" for i in range(records))


def test_register_upload_and_check_marks_ready(aws, api):
    status, created = api("POST", "/datasets", body={"name": "tickets", "format": "jsonl"})
    assert status == 201 and created["status"] == "pending"
    dataset_id = created["dataset_id"]
    key = f"alice/datasets/{dataset_id}/data.jsonl"
    assert created["s3_uri"] == f"s3://{_bucket()}/{key}"
    assert key in created["upload_url"] and "X-Amz-Signature" in created["upload_url"]

    _upload(key, _jsonl(300))
    assert check_function.lambda_handler(_s3_event(key), LambdaContext()) == {"checked": [dataset_id]}

    status, shown = api("GET", f"/datasets/{dataset_id}")
    assert status == 200 and shown["status"] == "ready" and shown["reason"] is None
    assert shown["bytes"] == len(_jsonl(300)) and shown["tokens"] > 2000


def test_bad_record_rejects_with_the_line(aws, api):
    _, created = api("POST", "/datasets", body={"name": "broken"})
    key = f"alice/datasets/{created['dataset_id']}/data.jsonl"
    _upload(key, _jsonl(300) + b'{"body": "no text here"}\n')
    check_function.lambda_handler(_s3_event(key), LambdaContext())
    _, shown = api("GET", f"/datasets/{created['dataset_id']}")
    assert shown["status"] == "rejected" and shown["reason"] == 'line 301 has no string "text" field'


def test_text_format_and_tenant_scoping(aws, api):
    _, created = api("POST", "/datasets", body={"name": "book", "format": "text"})
    assert created["s3_uri"].endswith("/data.txt")
    status, other = api("GET", f"/datasets/{created['dataset_id']}", tenant="mallory")
    assert status == 404 and other["error"]["code"] == "dataset_not_found"
    _, listed = api("GET", "/datasets", tenant="mallory")
    assert listed == {"datasets": []}
    _, mine = api("GET", "/datasets")
    assert [d["dataset_id"] for d in mine["datasets"]] == [created["dataset_id"]]


def test_only_a_ready_dataset_can_be_trained_on(aws, api):
    _, created = api("POST", "/datasets", body={"name": "tickets"})
    job = {"type": "train", "model": "base-debug", "dataset": created["dataset_id"], "hyperparams": {"train_steps": 10}}
    status, refused = api("POST", "/jobs/estimate", body=job)
    assert status == 422 and "pending" in refused["error"]["message"]
    assert refused["error"]["details"][0]["field"] == "dataset"

    key = f"alice/datasets/{created['dataset_id']}/data.jsonl"
    _upload(key, b"not json\n")
    check_function.lambda_handler(_s3_event(key), LambdaContext())
    status, refused = api("POST", "/jobs/estimate", body=job)
    assert status == 422 and "rejected" in refused["error"]["message"]

    status, refused = api("POST", "/jobs/estimate", body=job, tenant="mallory")
    assert status == 404 and refused["error"]["details"][0]["field"] == "dataset"

    _upload(key, _jsonl(300))
    check_function.lambda_handler(_s3_event(key), LambdaContext())
    status, quote = api("POST", "/jobs/estimate", body=job)
    assert status == 200 and quote["dataset"] == created["dataset_id"]


def test_upload_to_another_tenants_id_is_ignored(aws, api):
    _, created = api("POST", "/datasets", body={"name": "x"})
    key = f"mallory/datasets/{created['dataset_id']}/data.jsonl"
    _upload(key, _jsonl(300))
    assert check_function.lambda_handler(_s3_event(key), LambdaContext()) == {"checked": []}
    _, shown = api("GET", f"/datasets/{created['dataset_id']}")
    assert shown["status"] == "pending"


def test_bad_request_names_the_field(aws, api):
    status, body = api("POST", "/datasets", body={"name": "a b", "format": "csv"})
    assert status == 422
    assert {d["field"] for d in body["error"]["details"]} == {"name", "format"}


@pytest.mark.parametrize(
    ("data", "fmt", "reason"),
    [
        (b"not json\n", "jsonl", "line 1 is not JSON"),
        (b'["text"]\n', "jsonl", 'line 1 has no string "text" field'),
        (b"\n\n", "jsonl", "the dataset has no records"),
        (b"caf\xc3 au lait", "text", "the text is not UTF-8 (byte 3)"),
        (b"abc\x00def " * 10, "text", "NUL bytes"),
        (b"short text", "text", "training needs at least 2000"),
    ],
)
def test_check_reasons(data, fmt, reason):
    result = check_dataset([data], fmt)
    assert not result.ok and reason in result.reason


def test_size_limit_stops_reading():
    chunks_read = []

    def chunks():
        for i in range(100):
            chunks_read.append(i)
            yield b"word " * 200

    result = check_dataset(chunks(), "text", limit=5000)
    assert not result.ok and "5000-byte limit" in result.reason and len(chunks_read) == 6


def test_token_count_does_not_depend_on_chunking():
    text = ("Fusion grows a model, trains it, and contracts it again. " * 100).encode()
    whole = check_dataset([text], "text", min_tokens=0)
    for size in (1, 3, 7, 64):
        assert check_dataset([text[i:i + size] for i in range(0, len(text), size)], "text", min_tokens=0).tokens == whole.tokens


def test_dataset_keys():
    assert parse_dataset_key("t1/datasets/ds-0123456789ab/data.txt") == ("t1", "ds-0123456789ab", "text")
    assert parse_dataset_key("t1/other/ds-0123456789ab/data.txt") is None
    assert parse_dataset_key("t1/datasets/ds-0123456789ab/data.csv") is None
