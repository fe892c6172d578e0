"""Shared fixtures: every handler under its role from template.yaml (tests/permissions.py), a moto
AWS with every resource of template.yaml, an HTTP API caller, the local HTTP server, a fake SageMaker, an observer of the Fusion bus, and SageMaker state-change events as EventBridge delivers them."""

from __future__ import annotations

import base64
import io
import hashlib
import json
import os
import tarfile
import threading
import urllib.error
import urllib.request
from functools import cache
from types import SimpleNamespace
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from local.aws import LOCAL_ACCOUNT, LOCAL_REGION, LambdaContext  # noqa: F401 (the tests' context)
from local.resources import create_resources, function_environment, load_template
from local.server import api_event, make_server
from shared.contracts import ContractMetrics, HeldOut, Progress, TrainMetrics
from shared.outputs import metrics_key, model_uri
from shared.shapes import SIZES, grown_config
from shared.store import Catalog, seed_base_models
from shared.training_jobs import training_job_name
from tests import permissions

REGION = LOCAL_REGION
GROWN = grown_config(SIZES["debug"])

# The template's Powertools settings before any test imports a function: its Metrics take the
# namespace then. No X-Ray daemon listens here.
os.environ.update({k: v for k, v in function_environment(load_template()).items() if k.startswith("POWERTOOLS_")})
os.environ["POWERTOOLS_TRACE_DISABLED"] = "1"
permissions.install()


@pytest.fixture(autouse=True)
def roles():
    """Every handler runs under its role from template.yaml: a call it does not allow is answered
    AccessDenied, as AWS would, and fails the test whatever the code made of the answer."""
    recorder = permissions.RECORDER
    recorder.reset()
    recorder.enabled = True
    yield recorder
    recorder.enabled = False
    denied = recorder.denied()
    assert not denied, "calls the roles in template.yaml do not allow:\n" + "\n".join(
        f"  {c.function} {c.operation}: {r.action} on {r.resource}" for c in denied for r in c.denied)


@pytest.fixture
def aws(monkeypatch):
    """moto with the template's tables, queues, buckets and bus; the functions' env applied."""
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    for var in ("AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    with mock_aws():
        session = _session()
        env = create_resources(session)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        seed_base_models(Catalog(session=session), artifacts_bucket=env["ARTIFACTS_BUCKET"])
        publish_base_archive(session, env, "debug")
        # The functions' cached clients stay valid across cases: moto intercepts every client
        # while a mock is active, and table names, queue URLs and buckets are read from env per call.
        yield SimpleNamespace(session=session, env=env)


def publish_base_archive(session, env: dict, size: str, body: bytes = b"placeholder archive") -> None:
    """What an operator's upload of base-models/<size>/model.tar.gz does: the catalog's base model of
    that size becomes available (the API only looks that the archive exists)."""
    from shared import store

    session.client("s3").put_object(Bucket=env["ARTIFACTS_BUCKET"], Key=f"base-models/{size}/model.tar.gz", Body=body)
    store._PUBLISHED.clear()  # each case's moto starts without archives


def ready_dataset(aws, owner: str, ds: str | None = None) -> str:
    """A dataset of this owner value that its check made ready (recorded straight in the table)."""
    from shared.datasets import dataset_key

    ds = ds or f"ds-{hashlib.sha256(owner.encode()).hexdigest()[:12]}"
    aws.session.client("dynamodb").put_item(TableName=aws.env["DATASETS_TABLE"], Item={
        "dataset_id": {"S": ds}, "owner": {"S": owner}, "status": {"S": "ready"}, "name": {"S": "d"},
        "s3_uri": {"S": f"s3://{aws.env['DATA_BUCKET']}/{dataset_key(owner, ds, 'jsonl')}"},
        "created_at": {"S": "2026-01-01T00:00:00Z"}})
    return ds


@cache
def _session() -> boto3.session.Session:
    return boto3.session.Session(region_name=REGION)


@pytest.fixture
def api(aws):
    """call(method, path, body=None, *, tenant="alice", query="") -> (status, parsed JSON body)."""
    from functions.api.app import lambda_handler

    def call(method: str, path: str, body: Any = None, *, tenant: str = "alice", query: str = "",
             raw: str | None = None) -> tuple[int, Any]:
        text = raw if raw is not None else (json.dumps(body) if body is not None else None)
        event = api_event(method, path, query=query, headers={"content-type": "application/json"},
                          body=text, claims={"sub": tenant})
        result = lambda_handler(event, LambdaContext())
        payload = result.get("body") or "null"
        try:
            return result["statusCode"], json.loads(payload)
        except json.JSONDecodeError:
            return result["statusCode"], payload

    return call


@pytest.fixture
def server(aws):
    """The local HTTP server on a free loopback port, into the same API handler: its base URL."""
    httpd = make_server("127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def unsigned_jwt(claims: dict) -> str:
    encode = lambda part: base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode()
    return f"{encode({'alg': 'none'})}.{encode(claims)}."


def http(url: str, method: str = "GET", body: Any = None, token: str | None = None) -> tuple[int, Any]:
    """A real HTTP request: (status, parsed JSON body), error statuses included."""
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


class FakeSageMaker:
    """CreateTrainingJob / DescribeTrainingJob / StopTrainingJob with SageMaker's error codes: the
    queued errors are raised first, names are unique like AWS, and calls and stops are recorded."""

    def __init__(self):
        self.created: dict[str, dict] = {}
        self.stopped: list[str] = []
        self.errors: list[Exception] = []
        self.calls = 0

    def create_training_job(self, **request):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        if request["TrainingJobName"] in self.created:
            raise client_error("ResourceInUse", "Training job names must be unique within an AWS account and region")
        self.created[request["TrainingJobName"]] = request

    def describe_training_job(self, TrainingJobName):
        if TrainingJobName not in self.created:
            raise client_error("ResourceNotFound", "Requested resource not found.")
        return {"TrainingJobName": TrainingJobName, "TrainingJobStatus": "InProgress"}

    def stop_training_job(self, TrainingJobName):
        if TrainingJobName not in self.created:
            raise client_error("ValidationException", f"Requested resource not found: {TrainingJobName}")
        self.stopped.append(TrainingJobName)


def client_error(code: str, message: str = "boom", operation: str = "CreateTrainingJob") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message}}, operation)


@pytest.fixture
def observer(aws):
    """A queue subscribed to everything on the Fusion bus: what was published."""
    sqs, bridge = aws.session.client("sqs"), aws.session.client("events")
    url = sqs.create_queue(QueueName="observer")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    bus = aws.env["EVENT_BUS_NAME"]
    bridge.put_rule(Name="all", EventBusName=bus, EventPattern=json.dumps({"source": ["fusion"]}))
    bridge.put_targets(Rule="all", EventBusName=bus, Targets=[{"Id": "q", "Arn": arn}])

    def published():
        out = []
        while messages := sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages"):
            for m in messages:
                body = json.loads(m["Body"])
                out.append((body["detail-type"], body["detail"]))
                sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
        return out

    return published


def artifact(aws, job_id: str) -> str:
    """The job's model prefix, where SageMaker uploads /opt/ml/model uncompressed."""
    return model_uri(f"s3://{aws.env['ARTIFACTS_BUCKET']}/jobs/{job_id}/output/", training_job_name(job_id))


def put_metrics(aws, job_id: str, body: bytes) -> None:
    """metrics.json of the job where SageMaker uploads it: in its model prefix (any bytes, to break it)."""
    bucket, key, _ = metrics_key(artifact(aws, job_id))
    aws.session.client("s3").put_object(Bucket=bucket, Key=key, Body=body)


HELDOUT = HeldOut(source="split", windows=4, seq_len=64, tokens="all", sha256="5e" * 32)  # what metrics_document measured on


def metrics_document(job: dict, *, config=GROWN, tokens=None, perplexity=17.5, parent_perplexity=None) -> dict:
    """metrics.json as the container writes it for the job (tokens: any JSON value, to break it)."""
    source = SIZES["debug"]
    sizes = dict(job_id=job["job_id"], config=config, parameters_before=source.parameters(),
                 parameters_after=config.parameters(), depth_before=source.n_layers, depth_after=config.n_layers,
                 training_tokens=0, tokens_processed=0, tokens_per_second=0.0, wall_time_s=1.0, cycles=[],
                 final_perplexity=perplexity, heldout=HELDOUT)
    if job["type"] == "train":
        metrics = TrainMetrics(job_type="train", sequences_per_step=8, **sizes)
    else:
        metrics = ContractMetrics(job_type="contract", layers_contracted=[], contraction_ratio=0.5, block_influence={},
                                  perplexity_before=parent_perplexity or perplexity, perplexity_after_pruning=perplexity,
                                  perplexity_after_healing=None, healing_kept=None, **sizes)
    training_tokens = job["estimate"]["training_tokens"] if tokens is None else tokens
    return {**metrics.model_dump(mode="json"), "training_tokens": training_tokens}


def progress_document(job_id: str, tokens_trained: int, step: int = 1) -> str:
    """progress.json as the trainer writes it."""
    return Progress(job_id=job_id, job_type="train", turn=1, turns=1, cycle=1, cycles=1, step=step, total_steps=step,
                    loss=None, perplexity=None, tokens_trained=tokens_trained, tokens_per_second=0.0,
                    eta_seconds=0.0, updated_at="2026-01-01T00:00:00+00:00").model_dump_json()


def write_metrics(aws, job: dict, *, config=GROWN, tokens=None, perplexity=17.5, parent_perplexity=None,
                  document=None) -> None:
    """The job's metrics.json in its model prefix, where SageMaker uploads it."""
    metrics = document if document is not None else metrics_document(job, config=config, tokens=tokens,
                                                                      perplexity=perplexity,
                                                                      parent_perplexity=parent_perplexity)
    put_metrics(aws, job["job_id"], json.dumps(metrics).encode())


def tar_gz(members: dict[str, bytes]) -> bytes:
    """A gzipped tar archive of these files (name: bytes), as SageMaker packs its outputs."""
    blob = io.BytesIO()
    with tarfile.open(fileobj=blob, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return blob.getvalue()


def sagemaker_event(aws, job_id: str, status: str, reason: str | None = None, secondary: str | None = None) -> dict:
    """A SageMaker Training Job State Change event for the job's training job."""
    name = training_job_name(job_id)
    detail = {"TrainingJobName": name, "TrainingJobStatus": status, "SecondaryStatus": secondary or status,
              "TrainingJobArn": f"arn:aws:sagemaker:{REGION}:{LOCAL_ACCOUNT}:training-job/{name}"}
    if status == "Completed":
        detail["ModelArtifacts"] = {"S3ModelArtifacts": artifact(aws, job_id)}
    if reason:
        detail["FailureReason"] = reason
    return {"version": "0", "id": f"{job_id}-{status}", "detail-type": "SageMaker Training Job State Change",
            "source": "aws.sagemaker", "account": LOCAL_ACCOUNT, "time": "2026-01-01T00:00:00Z",
            "region": REGION, "resources": [detail["TrainingJobArn"]], "detail": detail}


def deliver(aws, job_id: str, *statuses: str, reason: str | None = None) -> list[dict]:
    """Hand the events function one state-change event per status, in the order given."""
    from functions.events import app as events

    return [events.lambda_handler(sagemaker_event(aws, job_id, s, reason), LambdaContext()) for s in statuses]
