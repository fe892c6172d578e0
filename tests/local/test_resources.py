"""template.yaml is the one source of the infrastructure: lint-clean, and what tests and local run on."""

import subprocess
import sys
from pathlib import Path

import pytest

from local.resources import TEMPLATE, _Tag, load_template

CONTRACT_ENV = {"JOBS_TABLE", "MODELS_TABLE", "DATASETS_TABLE", "IDEMPOTENCY_TABLE", "LAUNCH_QUEUE_URL",
                "ARTIFACTS_BUCKET", "DATA_BUCKET", "EVENT_BUS_NAME", "TRAINING_IMAGE_URI", "SAGEMAKER_ROLE_ARN",
                "POWERTOOLS_SERVICE_NAME"}


@pytest.mark.slow
def test_cfn_lint_reports_nothing():
    lint = Path(sys.executable).with_name("cfn-lint")
    result = subprocess.run([str(lint), str(TEMPLATE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_intrinsics_are_kept_as_tags():
    env = load_template()["Globals"]["Function"]["Environment"]["Variables"]
    assert isinstance(env["JOBS_TABLE"], _Tag) and env["JOBS_TABLE"].tag == "!Ref"


def test_tables_are_recoverable_and_encrypted():
    resources = load_template()["Resources"]
    tables = {k: r["Properties"] for k, r in resources.items() if r["Type"] == "AWS::DynamoDB::Table"}
    assert set(tables) == {"JobsTable", "ModelsTable", "DatasetsTable", "TenantsTable", "IdempotencyTable"}
    for props in tables.values():
        assert props["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"] is True
        assert props["SSESpecification"]["SSEEnabled"] is True


def test_buckets_are_private_encrypted_and_versioned():
    resources = load_template()["Resources"]
    buckets = [r["Properties"] for r in resources.values() if r["Type"] == "AWS::S3::Bucket"]
    assert len(buckets) == 2
    for props in buckets:
        assert all(props["PublicAccessBlockConfiguration"].values())
        assert props["VersioningConfiguration"]["Status"] == "Enabled"
        assert props["BucketEncryption"]["ServerSideEncryptionConfiguration"]


def test_pass_role_is_scoped_to_the_training_role_and_sagemaker():
    launcher = load_template()["Resources"]["LauncherFunction"]["Properties"]["Policies"]
    statements = [s for p in launcher if "Statement" in p for s in p["Statement"]]
    [pass_role] = [s for s in statements if s["Action"] == "iam:PassRole"]
    assert pass_role["Resource"].value == "SageMakerExecutionRole.Arn"
    assert pass_role["Condition"]["StringEquals"]["iam:PassedToService"] == "sagemaker.amazonaws.com"
    [launch] = [s for s in statements if "sagemaker:CreateTrainingJob" in s["Action"]]
    assert launch["Resource"].value.endswith("training-job/fusion-*")


def test_created_resources_give_the_functions_their_whole_environment(aws):
    assert CONTRACT_ENV <= set(aws.env)
    ddb = aws.session.client("dynamodb")
    jobs = ddb.describe_table(TableName=aws.env["JOBS_TABLE"])["Table"]
    assert jobs["KeySchema"] == [{"AttributeName": "job_id", "KeyType": "HASH"}]
    assert [i["IndexName"] for i in jobs["GlobalSecondaryIndexes"]] == ["by-owner", "by-status"]
    assert aws.session.client("s3").head_bucket(Bucket=aws.env["DATA_BUCKET"])
    assert aws.session.client("sqs").get_queue_attributes(QueueUrl=aws.env["LAUNCH_QUEUE_URL"])
    assert aws.session.client("events").describe_event_bus(Name=aws.env["EVENT_BUS_NAME"])["Name"]
