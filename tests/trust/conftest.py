"""Tenants with data and models of their own, one fake SageMaker behind the API and launcher, and a launcher driver."""

from __future__ import annotations

import json

import pytest

from functions.api import context
from shared.outputs import progress_key
from shared.store import Catalog, Jobs
from tests.conftest import GROWN, FakeSageMaker, LambdaContext, progress_document, ready_dataset


def dataset_id(owner: str) -> str:
    return f"ds-{owner[:1] * 12}"


@pytest.fixture
def tenants(aws, api):
    """alice and bob each own a ready dataset and a trained model."""
    catalog = Catalog(session=aws.session)
    for owner in ("alice", "bob"):
        ds = ready_dataset(aws, owner, dataset_id(owner))
        catalog.register({
            "model_id": f"m-{owner}", "owner": owner, "name": f"m-{owner}", "kind": "trained",
            "parent_id": "base-debug", "job_id": "j0", "parameters": GROWN.parameters(), "depth": GROWN.n_layers,
            "perplexity": 20.0, "artifact_uri": f"s3://{aws.env['ARTIFACTS_BUCKET']}/jobs/j0/output/fusion-j0/output/model/",
            "cost": "0.62", "config": GROWN.model_dump(mode="json"), "dataset": ds, "created_at": "t"})
    return aws


def train(owner: str = "alice", **hyper) -> dict:
    return {"type": "train", "model": "base-debug", "dataset": dataset_id(owner), "hyperparams": hyper}


@pytest.fixture
def sagemaker(aws, monkeypatch):
    """One fake SageMaker behind the API's and the launcher's clients."""
    from functions.launcher import app as launcher

    fake = FakeSageMaker()
    real = context.client
    monkeypatch.setattr(context, "client", lambda service: fake if service == "sagemaker" else real(service))
    jobs, _, bus = launcher._clients()
    monkeypatch.setattr(launcher, "_clients", lambda: (jobs, fake, bus))
    return fake


def launch(*job_ids: str, receive_count: int = 1) -> list[str]:
    """Run the launcher on one SQS batch; the ids of the messages it handed back for retry."""
    from functions.launcher import app as launcher

    records = [{"messageId": f"msg-{i}", "receiptHandle": "r", "body": json.dumps({"job_id": job_id}),
                "attributes": {"ApproximateReceiveCount": str(receive_count), "SentTimestamp": "0",
                               "SenderId": "s", "ApproximateFirstReceiveTimestamp": "0"},
                "messageAttributes": {}, "md5OfBody": "", "eventSource": "aws:sqs",
                "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:q", "awsRegion": "us-east-1"}
               for i, job_id in enumerate(job_ids)]
    result = launcher.lambda_handler({"Records": records}, LambdaContext())
    return [f["itemIdentifier"] for f in result["batchItemFailures"]]


def reports_uncompressed_model(training_job) -> None:
    """Have a moto training job report its model as SageMaker does for CompressionType NONE: the
    prefix output/model/ of the files it uploaded (moto names model.tar.gz whatever the type).
    Without the final slash, as the SageMaker Python SDK allows for (it adds one)."""
    config = training_job.output_data_config
    assert config.get("CompressionType") == "NONE", config
    training_job.model_artifacts = {
        "S3ModelArtifacts": f"{config['S3OutputPath'].rstrip('/')}/{training_job.training_job_name}/output/model"}


def write_progress(aws, job_id: str, tokens_trained: int) -> None:
    aws.session.client("s3").put_object(Bucket=aws.env["ARTIFACTS_BUCKET"], Key=progress_key(job_id),
                                        Body=progress_document(job_id, tokens_trained))


def set_budget(aws, tenant: str, budget_usd: str) -> None:
    """What an operator does to give a tenant a limit of their own: the tenant's record in the tenants table."""
    aws.session.client("dynamodb").update_item(
        TableName=aws.env["TENANTS_TABLE"], Key={"tenant": {"S": tenant}}, UpdateExpression="SET budget_usd = :b",
        ExpressionAttributeValues={":b": {"S": budget_usd}})


def stored(aws, job_id: str) -> dict:
    return Jobs(session=aws.session).get(job_id)


@pytest.fixture(autouse=True)
def _fresh_dataset_clients():
    """The dataset routes and check cache their S3 clients: start each case on this case's."""
    from functions.api import datasets as routes
    from functions.datasets import app as check

    for cached in (routes._s3, check._clients):
        cached.cache_clear()
    yield
