"""Tenant ids are opaque: any `sub` is a tenant of its own, whatever separators it holds, in every
key, prefix and tag it becomes part of."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from local.server import api_event
from shared.datasets import dataset_key, parse_dataset_key
from shared.tenancy import (
    MAX_ENCODED_LENGTH,
    InvalidTenant,
    PUBLIC_OWNER,
    check_tenant,
    data_uri_prefix,
    decode_tenant,
    encode_tenant,
    is_owner,
    owner_of,
)
from tests.conftest import LambdaContext

from .conftest import launch, ready_dataset, stored

# Every separator and escape character of the places a tenant goes (S3 keys and URIs, DynamoDB
# composite keys, tags, JSON, URL encoding, the encoding's own `=`), and names the service uses.
HOSTILE = ["a", "a#b", "a/b", "a|b", "auth0|5f0c1d", "b#c", "/", "//", "#", "|", ".", "..", ".a", "a.", "=", "=41",
           "A", "é", "e\u0301", "日本", "🙂", "a b", "a\tb", "a\nb", "a\x00b", "%2F", "a%7Cb", "+", "*", "?", "\\",
           "x" * 80, "datasets", "a/datasets/ds-aaaaaaaaaaaa", "public", PUBLIC_OWNER, "Public", "",
           "carol/x", "carol=2Fx", "carol=3D2Fx", "alice/models", "auth0|victim", "auth0=7Cvictim", ":", ";", ",",
           "&", "!", "$", "'", '"', "`", "~", "^", "<a>", "[a]", "{a}", "(a)", "@", "a\rb", "\u2028", "\u200b",
           "\ufeff", "a\x7fb", "base-debug", "-", "_", "0", "s3:", "s3://x/y", "..%2F", "%", "%%", "=zz", "=2e"]
HOSTILE = [sub for sub in HOSTILE if sub]  # "" is no tenant (test_a_sub_that_cannot_be_a_tenant_is_401)
# What SageMaker takes as a tag value (\p{L}\p{Z}\p{N}_.:/=+-@), narrowed to ASCII letters and digits.
SAGEMAKER_TAG_VALUE = re.compile(r"[A-Za-z0-9 _.:/=+\-@]{0,256}")


def _check(encoded: str) -> None:
    assert encoded and not {"/", "#", "|", "%", " "} & set(encoded) and encoded not in (".", "..")
    assert not encoded.startswith(".") and SAGEMAKER_TAG_VALUE.fullmatch(encoded)


def test_every_tenant_has_its_own_encoding_and_it_decodes_back():
    encoded = [encode_tenant(t) for t in HOSTILE]
    assert len(set(encoded)) == len(HOSTILE)
    for tenant, enc in zip(HOSTILE, encoded):
        _check(enc)
        assert decode_tenant(enc) == tenant and owner_of(tenant) == enc and is_owner(enc)
        assert parse_dataset_key(dataset_key(enc, "ds-0123456789ab", "jsonl")) == (enc, "ds-0123456789ab", "jsonl")
        assert enc != PUBLIC_OWNER
    assert encode_tenant("alice") == "alice" and encode_tenant("auth0|ab") == "auth0=7Cab"
    for not_an_encoding in ("a/b", "=4", "=zz", "=41", ".a", "a=7c", "=C3", "a|b", ""):
        assert decode_tenant(not_an_encoding) is None, not_an_encoding


@settings(max_examples=300, deadline=None, database=None)
@given(st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40))
def test_encoding_is_injective_and_safe(a, b):
    """Any text encodes injectively and decodes back; a `sub` whose encoding fits a tag value is a
    tenant and its owner value is safe everywhere, and one whose encoding does not (40 characters
    of four UTF-8 bytes each encode to 480) is refused, never cut."""
    encoded = encode_tenant(a)
    assert decode_tenant(encoded) == a
    assert (encoded == encode_tenant(b)) == (a == b)
    if len(encoded) <= MAX_ENCODED_LENGTH:
        _check(owner_of(a))
    else:
        with pytest.raises(InvalidTenant):
            owner_of(a)


def test_a_sub_that_cannot_be_a_tenant_is_401(aws, api):
    subs = [5, 1.5, True, ["alice"], {"a": 1}, "", "x" * MAX_ENCODED_LENGTH + "x", "é" * 50, "\ud800"]
    for sub, (method, path) in itertools.product(subs, [("GET", "/jobs"), ("GET", "/models"), ("GET", "/datasets"),
                                                        ("POST", "/datasets"), ("GET", "/jobs/x")]):
        status, body = api(method, path, {"name": "d"} if method == "POST" else None, tenant=sub)
        assert status == 401 and body["error"]["code"] == "unauthorized", (sub, body)
    for sub in subs:
        with pytest.raises(ValueError):
            check_tenant(sub)
    assert check_tenant("x" * MAX_ENCODED_LENGTH) == "x" * MAX_ENCODED_LENGTH


def _s3_job(aws, sub: str) -> dict:
    """A train job on a ready dataset of the tenant `sub`, named by the s3:// URI of its upload."""
    owner = owner_of(sub)
    ds = ready_dataset(aws, owner)
    return {"type": "train", "model": "base-debug", "dataset": f"{data_uri_prefix(aws.env['DATA_BUCKET'], owner)}"
            f"datasets/{ds}/data.jsonl", "hyperparams": {"train_steps": 2, "seq_len": 16}}


def _post(owner: str, body: dict, key: str | None = None) -> tuple[int, dict]:
    from functions.api.app import lambda_handler

    headers = {"content-type": "application/json", **({"idempotency-key": key} if key else {})}
    event = api_event("POST", "/jobs", headers=headers, body=json.dumps(body), claims={"sub": owner})
    result = lambda_handler(event, LambdaContext())
    return result["statusCode"], json.loads(result["body"])


def test_a_hash_in_a_tenant_never_meets_another_tenants_idempotency_key(tenants):
    first = _post("a", _s3_job(tenants, "a"), key="b#c")
    second = _post("a#b", _s3_job(tenants, "a#b"), key="c")
    assert first[0] == second[0] == 201, (first, second)
    assert first[1]["job_id"] != second[1]["job_id"]
    assert (first[1]["owner"], second[1]["owner"]) == ("a", "a=23b")
    assert _post("a", _s3_job(tenants, "a"), key="b#c")[1]["job_id"] == first[1]["job_id"]  # still idempotent


def test_a_slash_in_a_tenant_stays_inside_its_own_prefix(tenants, api):
    data = tenants.env["DATA_BUCKET"]
    ready_dataset(tenants, "alice", "ds-aaaaaaaaaaaa")
    for sub in ("alice/datasets", "alice/", "alice/datasets/ds-aaaaaaaaaaaa"):
        status, body = api("POST", "/jobs", {**_s3_job(tenants, sub),
                                             "dataset": f"s3://{data}/alice/datasets/ds-aaaaaaaaaaaa/data.jsonl"},
                           tenant=sub)
        assert status == 422 and body["error"]["details"][0]["field"] == "dataset", body
        assert api("POST", "/jobs/estimate", _s3_job(tenants, sub), tenant=sub)[0] == 200
    listed = api("GET", "/datasets", tenant="alice/datasets")[1]["datasets"]
    assert listed and all(d["s3_uri"].startswith(data_uri_prefix(data, "alice=2Fdatasets")) for d in listed)


@pytest.mark.parametrize("sub", ["auth0|5f0c1d", "x/y#z", "日本/..", "."])
def test_any_tenant_can_upload_a_dataset_that_is_checked_and_theirs_alone(aws, api, sub):
    from functions.datasets import app as check

    status, created = api("POST", "/datasets", {"name": "d", "format": "text"}, tenant=sub)
    assert status == 201, created
    key = created["s3_uri"].split("/", 3)[3]
    assert created["s3_uri"].startswith(data_uri_prefix(aws.env["DATA_BUCKET"], owner_of(sub)) + "datasets/")
    aws.session.client("s3").put_object(Bucket=aws.env["DATA_BUCKET"], Key=key, Body=b"word " * 3000)
    event = {"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
                          "s3": {"bucket": {"name": aws.env["DATA_BUCKET"]}, "object": {"key": key, "size": 1}}}]}
    assert check.lambda_handler(event, LambdaContext()) == {"checked": [created["dataset_id"]]}
    assert api("GET", f"/datasets/{created['dataset_id']}", tenant=sub)[1]["status"] == "ready"
    for other in ("auth0", sub[:-1] or "x", encode_tenant(sub)):
        if other != sub:
            assert api("GET", f"/datasets/{created['dataset_id']}", tenant=other)[0] == 404


def test_a_pipe_in_a_tenant_is_a_valid_sagemaker_tag_and_the_job_launches(tenants, api, sagemaker):
    sub = "auth0|5f0c1d/é#x"
    status, job = api("POST", "/jobs", _s3_job(tenants, sub), tenant=sub)
    assert status == 201, job
    assert launch(job["job_id"]) == []
    tags = {t["Key"]: t["Value"] for t in sagemaker.created[f"fusion-{job['job_id']}"]["Tags"]}
    assert SAGEMAKER_TAG_VALUE.fullmatch(tags["fusion:owner"]) and decode_tenant(tags["fusion:owner"]) == sub
    assert stored(tenants, job["job_id"])["status"] == "launching"


def test_a_requested_job_whose_owner_cannot_be_a_tenant_is_rejected(tenants, observer):
    from functions.events import app as events

    # Owner values only: a raw sub with a separator, the public owner, and what is no encoding are refused.
    owners = (5, ["alice"], "", "x" * (MAX_ENCODED_LENGTH + 1), PUBLIC_OWNER, "a#b", "alice/models", "=zz", ".a")
    for owner in owners:
        event = {"id": f"e-{owner!s:.10}", "detail-type": "Fusion Job Requested", "source": "pipeline",
                 "detail": {"owner": owner, "request": _s3_job(tenants, "alice")}}
        answer = events.lambda_handler(event, LambdaContext())
        assert answer["accepted"] is False and answer["error"]["details"][0]["field"] == "owner"
    assert tenants.session.client("dynamodb").scan(TableName=tenants.env["JOBS_TABLE"])["Items"] == []
    assert [kind for kind, _ in observer()] == ["Fusion Job Rejected"] * len(owners)


def _register_folder(api, sub: str, uri: str) -> tuple[int, dict]:
    return api("POST", "/models", {"name": "mine", "uri": uri}, tenant=sub)


@pytest.mark.parametrize("sub", HOSTILE)
def test_a_model_folder_is_registered_only_under_the_callers_own_encoded_prefix(aws, api, sub):
    """POST /models builds the prefix it checks with the function that builds every tenant prefix:
    the raw sub's folder (alice's, for a sub "alice/models") and any neighbour's are refused."""
    data = aws.env["DATA_BUCKET"]
    own = data_uri_prefix(data, owner_of(sub))
    status, model = _register_folder(api, sub, own + "models/qwen/")
    assert status == 201 and model["owner"] == owner_of(sub), model
    others = {f"s3://{data}/{sub}/models/qwen/", f"s3://{data}/{sub}/", f"s3://{data}/{owner_of(sub)}x/m/",
              own + "../alice/m/", own + "./m/", own, f"s3://{data}/{owner_of(sub)[:-1] or 'x'}/m/"}
    for uri in others - {own + "models/qwen/"}:
        status, body = _register_folder(api, sub, uri)
        assert status == 422 and body["error"]["details"][0]["field"] == "uri", (sub, uri, body)


def test_the_issues_crossings_are_closed(aws, api):
    data = aws.env["DATA_BUCKET"]
    # `alice/models` may not register alice's folder; `carol=2Fx` (raw) may not reach carol/x's prefix.
    assert _register_folder(api, "alice/models", f"s3://{data}/alice/models/qwen/")[0] == 422
    assert _register_folder(api, "carol=2Fx", f"s3://{data}/carol=2Fx/m/")[0] == 422
    assert _register_folder(api, "carol/x", f"s3://{data}/carol=2Fx/m/")[0] == 201
    # `auth0|victim` may register in its own encoded prefix.
    status, model = _register_folder(api, "auth0|victim", f"s3://{data}/auth0=7Cvictim/m/")
    assert status == 201 and model["owner"] == "auth0=7Cvictim"


@pytest.mark.parametrize("sub", ["public", "(public)", "Public", "=28public=29"])
def test_a_tenant_named_like_the_public_owner_owns_only_its_own_models(tenants, api, sub):
    """Base models are owned by a value no sub encodes to: a tenant named "public" sees each base
    model once, may not contract one, and its own models reach no one else's catalog."""
    data = tenants.env["DATA_BUCKET"]
    status, mine = _register_folder(api, sub, data_uri_prefix(data, owner_of(sub)) + "m/")
    assert status == 201 and mine["owner"] != PUBLIC_OWNER
    listed = [m["model_id"] for m in api("GET", "/models", tenant=sub)[1]["models"]]
    assert len(listed) == len(set(listed)) and mine["model_id"] in listed
    for other in ("alice", "bob"):
        assert mine["model_id"] not in {m["model_id"] for m in api("GET", "/models", tenant=other)[1]["models"]}
        assert api("GET", f"/models/{mine['model_id']}", tenant=other)[0] == 404
        assert api("GET", f"/models/{mine['model_id']}/download", tenant=other)[0] == 404
    contract = {"type": "contract", "dataset": ready_dataset(tenants, owner_of(sub)),
                "hyperparams": {"source_model_id": "base-debug", "num_layers_to_contract": 1}}
    status, body = api("POST", "/jobs", contract, tenant=sub)
    assert status == 422 and "is a base model" in body["error"]["details"][0]["message"]
    assert api("GET", "/models/base-debug", tenant=sub)[1]["owner"] == PUBLIC_OWNER


def test_only_the_named_principals_may_request_jobs_on_the_bus():
    """A requested job names its owner, so the bus policy denies putting one to everyone else."""
    from local.resources import load_template
    from shared.events import JOB_REQUESTED

    template = load_template()
    parameter = template["Parameters"]["JobRequesterArns"]
    assert parameter["Type"] == "CommaDelimitedList" and parameter["Default"] == ""  # no one, until named
    (policy,) = [r["Properties"] for r in template["Resources"].values() if r["Type"] == "AWS::Events::EventBusPolicy"]
    statement = policy["Statement"]
    assert policy["EventBusName"].tag == "!Ref" and policy["EventBusName"].value == "EventBus"
    assert (statement["Effect"], statement["Principal"], statement["Action"]) == ("Deny", "*", "events:PutEvents")
    condition = statement["Condition"]
    assert condition.tag == "!If" and condition.value[0] == "HasJobRequesters"
    named, nobody = condition.value[1], condition.value[2]
    for branch in (named, nobody):
        assert branch["StringEquals"] == {"events:detail-type": JOB_REQUESTED}
    assert named["ArnNotLike"]["aws:PrincipalArn"].value == "JobRequesterArns" and "ArnNotLike" not in nobody
    assert "JobRequesterArns" in (Path(__file__).parents[2] / "docs/api.md").read_text()
