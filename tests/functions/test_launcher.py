"""The launcher: one training job per job, retries on limits, failure with a reason otherwise."""

import json

import pytest
from botocore.exceptions import EndpointConnectionError

from functions.launcher import app as launcher
from shared.admission import resolve
from shared.contracts import PRECISION_ENV
from shared.settings import JOB_REQUEST
from shared.store import Catalog, Datasets, Jobs
from tests.conftest import FakeSageMaker, LambdaContext, client_error, ready_dataset


@pytest.fixture
def queued(aws):
    """A stored queued train job of alice on base-debug; returns its id."""
    jobs = Jobs(session=aws.session)
    request = JOB_REQUEST.validate_python({"type": "train", "model": "base-debug",
                                           "dataset": ready_dataset(aws, "alice", "ds-corpus000000"),
                                           "hyperparams": {"turns": 2, "lr": 3e-4}})
    job = resolve(request, "alice", catalog=Catalog(session=aws.session),
                  datasets=Datasets(session=aws.session), data_bucket=aws.env["DATA_BUCKET"], s3=aws.session.client("s3"))
    jobs.create(job)
    return job["job_id"]


@pytest.fixture
def sagemaker(aws, monkeypatch):
    fake = FakeSageMaker()
    jobs, _, bus = launcher._clients()
    monkeypatch.setattr(launcher, "_clients", lambda: (jobs, fake, bus))
    return fake


def _sqs(*job_ids, receive_count=1):
    return {"Records": [{
        "messageId": f"msg-{i}", "receiptHandle": "r", "body": json.dumps({"job_id": job_id}),
        "attributes": {"ApproximateReceiveCount": str(receive_count), "SentTimestamp": "0",
                       "SenderId": "s", "ApproximateFirstReceiveTimestamp": "0"},
        "messageAttributes": {}, "md5OfBody": "", "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:fusion-LaunchQueue", "awsRegion": "us-east-1",
    } for i, job_id in enumerate(job_ids)]}


def _run(*job_ids, receive_count=1):
    result = launcher.lambda_handler(_sqs(*job_ids, receive_count=receive_count), LambdaContext())
    return [f["itemIdentifier"] for f in result["batchItemFailures"]]


def _job(aws, job_id):
    return Jobs(session=aws.session).get(job_id)


def test_launch_builds_the_training_job(aws, queued, sagemaker):
    assert _run(queued) == []
    [request] = sagemaker.created.values()
    env = aws.env
    assert request["TrainingJobName"] == f"fusion-{queued}"
    assert request["HyperParameters"]["job_id"] == queued and request["HyperParameters"]["turns"] == "2"
    assert all(isinstance(v, str) for v in request["HyperParameters"].values())
    assert request["AlgorithmSpecification"]["TrainingImage"] == env["TRAINING_IMAGE_URI"]
    metric_names = {m["Name"] for m in request["AlgorithmSpecification"]["MetricDefinitions"]}
    assert {"train_loss", "heldout_perplexity", "tokens_per_second"} <= metric_names
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in request["InputDataConfig"]}
    assert channels == {"training": f"s3://{env['DATA_BUCKET']}/alice/datasets/ds-corpus000000/data.jsonl",
                        "model": f"s3://{env['ARTIFACTS_BUCKET']}/base-models/debug/model.tar.gz"}
    assert request["OutputDataConfig"]["S3OutputPath"] == f"s3://{env['ARTIFACTS_BUCKET']}/jobs/{queued}/output/"
    assert request["OutputDataConfig"]["CompressionType"] == "NONE"  # the model uploaded file by file, not gzipped
    assert request["CheckpointConfig"]["S3Uri"] == f"s3://{env['ARTIFACTS_BUCKET']}/checkpoints/{queued}/"
    assert request["ResourceConfig"]["InstanceType"] == "ml.g5.xlarge"
    estimate = _job(aws, queued)["estimate"]
    assert request["StoppingCondition"] == {"MaxRuntimeInSeconds": estimate["max_runtime_seconds"]}
    assert request["EnableManagedSpotTraining"] is False
    assert {"Key": "fusion:owner", "Value": "alice"} in request["Tags"]
    assert {"Key": "fusion:job-id", "Value": queued} in request["Tags"]
    assert request["RoleArn"] == env["SAGEMAKER_ROLE_ARN"]
    job = _job(aws, queued)
    assert job["status"] == "launching" and job["training_job_name"] == f"fusion-{queued}"


def test_the_request_is_valid_for_the_real_sagemaker_api(aws, queued):
    """moto's SageMaker behind botocore's parameter validation accepts the request as built."""
    assert _run(queued) == []
    described = aws.session.client("sagemaker").describe_training_job(TrainingJobName=f"fusion-{queued}")
    assert described["HyperParameters"]["lr"] == "0.0003"


def test_spot_adds_a_wait_limit(aws, queued, sagemaker, monkeypatch):
    monkeypatch.setenv("FUSION_USE_SPOT", "true")
    _run(queued)
    [request] = sagemaker.created.values()
    stopping = request["StoppingCondition"]
    assert request["EnableManagedSpotTraining"] is True
    assert stopping["MaxWaitTimeInSeconds"] >= stopping["MaxRuntimeInSeconds"]


@pytest.mark.parametrize("setting, sent", [(None, "auto"), ("fp32", "fp32"), ("bf16", "bf16")])
def test_the_stacks_precision_reaches_the_container(aws, queued, sagemaker, monkeypatch, setting, sent):
    if setting is None:
        monkeypatch.delenv(PRECISION_ENV, raising=False)
    else:
        monkeypatch.setenv(PRECISION_ENV, setting)
    _run(queued)
    [request] = sagemaker.created.values()
    assert request["Environment"] == {PRECISION_ENV: sent}


def test_a_repeated_message_starts_no_second_job(aws, queued, sagemaker):
    assert _run(queued) == []
    assert _run(queued, queued) == []
    assert len(sagemaker.created) == 1 and sagemaker.calls == 3
    assert _job(aws, queued)["status"] == "launching"  # until SageMaker's first event moves it


def test_a_message_after_the_job_runs_does_nothing(aws, queued, sagemaker):
    _run(queued)
    Jobs(session=aws.session).transition(queued, "running")
    assert _run(queued) == [] and sagemaker.calls == 1


@pytest.mark.parametrize("error", [
    client_error("ThrottlingException", "Rate exceeded"),
    client_error("ResourceLimitExceeded", "The account-level service limit for ml.g5.xlarge is 0"),
    EndpointConnectionError(endpoint_url="https://api.sagemaker.us-east-1.amazonaws.com"),
])
def test_limits_retry_the_message_and_keep_the_job(aws, queued, sagemaker, error):
    sagemaker.errors = [error]
    assert _run(queued) == ["msg-0"]
    assert _job(aws, queued)["status"] == "launching"
    assert _run(queued, receive_count=2) == []  # the redelivery launches it
    assert len(sagemaker.created) == 1 and _job(aws, queued)["status"] == "launching"


def test_limits_fail_the_job_after_the_last_attempt(aws, queued, sagemaker, monkeypatch):
    monkeypatch.setenv("FUSION_MAX_LAUNCH_ATTEMPTS", "3")
    sagemaker.errors = [client_error("ResourceLimitExceeded", "quota 0")] * 3
    assert _run(queued, receive_count=2) == ["msg-0"]
    assert _run(queued, receive_count=3) == []
    job = _job(aws, queued)
    assert job["status"] == "failed" and "after 3 attempts" in job["failure_reason"] and "quota 0" in job["failure_reason"]


def test_a_permanent_error_fails_the_job_with_the_reason(aws, queued, sagemaker):
    sagemaker.errors = [client_error("ValidationException", "Invalid instance type")]
    assert _run(queued) == []
    job = _job(aws, queued)
    assert job["status"] == "failed" and "ValidationException: Invalid instance type" in job["failure_reason"]
    assert job["bill"] == "0.00"
    assert _run(queued) == [] and sagemaker.calls == 1  # a late duplicate changes nothing


def test_a_batch_reports_only_the_failed_messages(aws, queued, sagemaker):
    other = Jobs(session=aws.session)
    second = {**_job(aws, queued), "job_id": "second-job", "status": "queued", "training_job_name": None}
    other.create(second)
    sagemaker.errors = [client_error("ThrottlingException")]
    assert _run(queued, "second-job") == ["msg-0"]
    assert list(sagemaker.created) == ["fusion-second-job"]


def test_an_unknown_job_is_dropped(aws, sagemaker):
    assert _run("no-such-job") == [] and sagemaker.calls == 0
