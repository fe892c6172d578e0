"""`fusion models deploy|undeploy` on moto: the SageMaker model, endpoint config and endpoint the
SDK creates (read back), the export unpacked for them, the endpoint role that serves them, and
every refusal as one line."""

from __future__ import annotations

import json
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from botocore.awsrequest import AWSResponse
from botocore.parsers import create_parser

from local import deploy
from local.cli import main
from local.server import LOCAL_TENANT
from shared.contracts import METRICS
from shared.outputs import model_uri
from shared.state_changes import catalog_entry
from shared.training_jobs import training_job_name
from shared.store import PUBLIC_OWNER, Catalog
from tests import permissions
from tests.conftest import GROWN, REGION, metrics_document, tar_gz

ROLE = "arn:aws:iam::123456789012:role/fusion-EndpointRole-x"
EXPORT = {"config.json": json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}).encode(),
          "model.safetensors": bytes(range(256)) * 64, "tokenizer.json": b'{"model": {}}',
          "generation_config.json": b'{"eos_token_id": 2}'}
# What the SDK's tables resolve SERVING_VERSION to in us-east-1 (AWS's registry of that region).
IMAGE = "763104351884.dkr.ecr.us-east-1.amazonaws.com/huggingface-pytorch-tgi-inference:2.7.0-tgi3.3.6-gpu-py311-cu124-ubuntu22.04"


def trained(aws, job_id: str = "j-deploy", *, export: bool = True) -> dict:
    """A trained model in the catalog, its archive (compact model at the root, hf/ if `export`) in S3."""
    job = {"job_id": job_id, "owner": LOCAL_TENANT, "type": "train", "model": "base-debug", "dataset": None,
           "settings": {"output_name": "served"}}
    key = f"jobs/{job_id}/output/{training_job_name(job_id)}/output/model.tar.gz"
    bucket = aws.env["ARTIFACTS_BUCKET"]
    metrics = METRICS.validate_python(metrics_document(job, config=GROWN, tokens=0))
    model = catalog_entry(job, metrics, f"s3://{bucket}/{key}", Decimal("1"))
    files = {"./config.json": b"{}", "./model.safetensors": b"compact"}
    files |= {f"./hf/{name}": data for name, data in EXPORT.items()} if export else {}
    aws.session.client("s3").put_object(Bucket=bucket, Key=key, Body=tar_gz(files))
    Catalog(session=aws.session).register(model)
    return model


def made(aws, job_id: str = "j-flat") -> dict:
    """A trained model in the catalog as a job makes it now: its files uploaded uncompressed under
    the job's model prefix (the compact model at the root, the export in hf/)."""
    job = {"job_id": job_id, "owner": LOCAL_TENANT, "type": "train", "model": "base-debug", "dataset": None,
           "settings": {"output_name": "served"}}
    bucket = aws.env["ARTIFACTS_BUCKET"]
    uri = model_uri(f"s3://{bucket}/jobs/{job_id}/output/", training_job_name(job_id))
    metrics = METRICS.validate_python(metrics_document(job, config=GROWN, tokens=0))
    model = catalog_entry(job, metrics, uri, Decimal("1"))
    prefix = uri.removeprefix(f"s3://{bucket}/")
    for name, data in {"config.json": b"{}", "model.safetensors": b"compact",
                       **{f"hf/{n}": d for n, d in EXPORT.items()}}.items():
        aws.session.client("s3").put_object(Bucket=bucket, Key=prefix + name, Body=data)
    Catalog(session=aws.session).register(model)
    return model


def test_a_model_a_job_made_is_served_from_hf_of_its_prefix_as_it_is(aws, server, capsys):
    """Uploaded uncompressed, the export is already a folder: the endpoint reads hf/ of the model's
    prefix (S3Prefix, CompressionType None), nothing is unpacked or copied, and the endpoint role
    reads that folder and not the compact model beside it."""
    model = made(aws)
    bucket = aws.env["ARTIFACTS_BUCKET"]
    s3, sm = aws.session.client("s3"), aws.session.client("sagemaker")
    before = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="jobs/")["Contents"])
    assert fusion(server, "deploy", model["model_id"], "--instance-type", "ml.g4dn.xlarge", "--role", ROLE,
                  "--no-wait") == 0
    folder = model["artifact_uri"] + "hf/"
    name = deploy.default_endpoint_name(model["model_id"])
    assert sm.describe_model(ModelName=name)["PrimaryContainer"]["ModelDataSource"] == {"S3DataSource": {
        "S3Uri": folder, "S3DataType": "S3Prefix", "CompressionType": "None"}}
    assert sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="jobs/")["Contents"]) == before
    statements = permissions.resolved_role("EndpointRole")
    arn, key = f"arn:aws:s3:::{bucket}", folder.removeprefix(f"s3://{bucket}/")
    needs = [permissions.Request("s3:ListBucket", arn, (("s3:prefix", key),)),
             *[permissions.Request("s3:GetObject", f"{arn}/{key}{n}") for n in EXPORT]]
    assert [r for r in needs if not permissions.allowed(statements, r)] == []
    compact = model["artifact_uri"].removeprefix(f"s3://{bucket}/") + "model.safetensors"
    assert not permissions.allowed(statements, permissions.Request("s3:GetObject", f"{arn}/{compact}"))


@pytest.fixture(autouse=True)
def quick_polls(monkeypatch):
    """The SDK sleeps 30 s before each look at a new endpoint; moto's is in service at once."""
    deploy._sdk()
    import sagemaker.session

    wait_until = sagemaker.session._wait_until
    monkeypatch.setattr(sagemaker.session, "_wait_until", lambda callable_fn, poll=5: wait_until(callable_fn, 0))


def fusion(server: str, *argv: str, as_json: bool = False) -> int:
    return main(["--api-url", server, *(["--json"] if as_json else []), "models", *argv])


def one_line(capsys) -> str:
    """The error's one line; what may follow it is the CLI's indented hints of what to do."""
    err = capsys.readouterr().err.strip()
    first, *hints = err.splitlines()
    assert "Traceback" not in err and all(hint.startswith("  ") for hint in hints), err
    return first


def test_deploy_creates_model_config_and_endpoint_as_asked_and_undeploy_removes_all_three(aws, server, capsys):
    model = trained(aws)
    name = deploy.default_endpoint_name(model["model_id"])
    assert fusion(server, "deploy", model["model_id"], "--instance-type", "ml.g4dn.12xlarge", "--role", ROLE,
                  "--stack", "fusion-prod", as_json=True) == 0
    shown = json.loads(capsys.readouterr().out)
    sm, s3 = aws.session.client("sagemaker"), aws.session.client("s3")
    bucket = aws.env["ARTIFACTS_BUCKET"]
    prefix = model["artifact_uri"].removeprefix(f"s3://{bucket}/").rsplit("/", 1)[0] + "/hf/"
    context = GROWN.context_length

    container = sm.describe_model(ModelName=name)["PrimaryContainer"]
    assert container["Image"] == IMAGE == shown["image_uri"]
    assert container["ModelDataSource"] == {"S3DataSource": {
        "S3Uri": f"s3://{bucket}/{prefix}", "S3DataType": "S3Prefix", "CompressionType": "None"}}
    assert container["Environment"] == {"HF_MODEL_ID": "/opt/ml/model", "SM_NUM_GPUS": "4",
                                        "MAX_INPUT_LENGTH": str(context - context // 4),
                                        "MAX_TOTAL_TOKENS": str(context)}
    assert sm.describe_model(ModelName=name)["ExecutionRoleArn"] == ROLE
    [variant] = sm.describe_endpoint_config(EndpointConfigName=name)["ProductionVariants"]
    assert (variant["ModelName"], variant["InstanceType"], variant["InitialInstanceCount"]) == (name, "ml.g4dn.12xlarge", 1)
    assert variant["ContainerStartupHealthCheckTimeoutInSeconds"] == deploy.HEALTH_CHECK_TIMEOUT_S
    assert sm.describe_endpoint(EndpointName=name)["EndpointStatus"] == shown["status"] == "InService"
    endpoint_arn = sm.describe_endpoint(EndpointName=name)["EndpointArn"]
    tags = sm.list_tags(ResourceArn=endpoint_arn)["Tags"]
    assert {"Key": deploy.MODEL_TAG, "Value": model["model_id"]} in tags
    assert {"Key": deploy.STACK_TAG, "Value": "fusion-prod"} in tags  # that stack's API may invoke it
    # The export, unpacked beside the archive byte for byte, and nothing of the compact model.
    listed = {o["Key"]: o["Size"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]}
    assert listed == {prefix + n: len(d) for n, d in EXPORT.items()}
    assert all(s3.get_object(Bucket=bucket, Key=prefix + n)["Body"].read() == d for n, d in EXPORT.items())

    # The endpoint role allows what the endpoint reads and pulls, and not the compact model or any data.
    statements = permissions.resolved_role("EndpointRole")
    arn = f"arn:aws:s3:::{bucket}"
    registry, repository = IMAGE.split(":")[0].split("/", 1)
    needs = [permissions.Request("s3:ListBucket", arn, (("s3:prefix", prefix),)),
             *[permissions.Request("s3:GetObject", f"{arn}/{prefix}{n}") for n in EXPORT],
             *[permissions.Request(a, f"arn:aws:ecr:{REGION}:{registry.split('.')[0]}:repository/{repository}")
               for a in ("ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability")],
             permissions.Request("ecr:GetAuthorizationToken", "*"),
             permissions.Request("logs:CreateLogStream",
                                 f"arn:aws:logs:{REGION}:123456789012:log-group:/aws/sagemaker/Endpoints/{name}:log-stream:x")]
    assert [r for r in needs if not permissions.allowed(statements, r)] == []
    group = f"arn:aws:logs:{REGION}:123456789012:log-group:/aws/sagemaker/Endpoints/*"
    assert permissions.unused_grants_of(statements, needs) == [
        ("s3:GetObject", f"{arn}/base-models/*"), ("s3:GetObject", f"{arn}/jobs/*/output/model/hf/*"),
        ("logs:CreateLogGroup", group), ("logs:PutLogEvents", group)]
    for denied in (permissions.Request("s3:GetObject", arn + "/" + model["artifact_uri"].split(bucket + "/")[1]),
                   permissions.Request("s3:GetObject", f"arn:aws:s3:::{aws.env['DATA_BUCKET']}/{LOCAL_TENANT}/x"),
                   permissions.Request("s3:ListBucket", arn, (("s3:prefix", "jobs/"),)),
                   permissions.Request("s3:PutObject", f"{arn}/{prefix}config.json")):
        assert not permissions.allowed(statements, denied), denied

    # The name is taken now: refused before anything is created.
    assert fusion(server, "deploy", model["model_id"], "--instance-type", "ml.g4dn.xlarge", "--role", ROLE) == 1
    assert f"{name} is taken (a model and endpoint config and endpoint of that name exist)" in one_line(capsys)

    assert fusion(server, "undeploy", name) == 0
    assert capsys.readouterr().out.strip() == f"deleted endpoint {name}, endpoint config {name}, model {name}"
    for call, key in ((sm.describe_model, "ModelName"), (sm.describe_endpoint_config, "EndpointConfigName"),
                      (sm.describe_endpoint, "EndpointName")):
        with pytest.raises(sm.exceptions.ClientError, match="Could not find"):
            call(**{key: name})
    assert fusion(server, "undeploy", name) == 1  # moto's answer for a missing endpoint
    assert one_line(capsys).startswith(f"error: AWS refused DescribeEndpoint: ValidationException: Could not find endpoint")

    # A second deploy reuses the unpacked export (its manifest matches) and serves the same prefix.
    s3.delete_object(Bucket=bucket, Key=model["artifact_uri"].split(bucket + "/")[1])
    assert fusion(server, "deploy", model["model_id"], "--instance-type", "ml.p3.2xlarge", "--role", ROLE,
                  "--gpus", "2", "--no-wait") == 0  # --gpus rules over the tables (which say 1)
    assert sm.describe_model(ModelName=name)["PrimaryContainer"]["Environment"]["SM_NUM_GPUS"] == "2"
    with capsys.disabled():
        print(f"\nmoto deploy of {model['model_id']} on ml.g4dn.12xlarge: image {shown['image_uri']}; model data "
              f"{shown['model_data']}; environment {shown['environment']}")


@pytest.mark.parametrize("argv, export, line", [
    (["deploy", "m-nobody", "--instance-type", "ml.g4dn.xlarge", "--role", ROLE], True, "error: model 'm-nobody' was not found"),
    (["deploy", "{model}", "--instance-type", "ml.m5.xlarge", "--role", ROLE], True,
     "error: no GPU count known for ml.m5.xlarge (a GPU instance type such as ml.g5.xlarge is needed): pass --gpus N"),
    (["deploy", "{model}", "--instance-type", "ml.g6.xlarge", "--role", ROLE, "--gpus", "0"], True,
     "error: --gpus must be at least 1"),
    (["deploy", "{model}", "--instance-type", "ml.g4dn.xlarge"], True,
     "error: no execution role: pass --role (stack output EndpointRoleArn) or set FUSION_ENDPOINT_ROLE_ARN"),
    (["deploy", "{model}", "--instance-type", "ml.g4dn.xlarge", "--role", ROLE], False,
     "error: model {model} has no transformers export (hf/ of its archive): its archive predates exports"),
    (["deploy", "{model}", "--instance-type", "ml.g4dn.xlarge", "--role", ROLE, "--endpoint-name", "served_1"], True,
     "error: endpoint name 'served_1' must be letters, digits and '-'"),
])
def test_what_no_endpoint_can_serve_is_refused_in_one_line_and_nothing_is_created(aws, server, capsys, monkeypatch,
                                                                                   argv, export, line):
    monkeypatch.delenv(deploy.ROLE_ENV, raising=False)
    model = trained(aws, export=export)
    assert fusion(server, *[a.format(model=model["model_id"]) for a in argv]) == 1
    assert one_line(capsys).startswith(line.format(model=model["model_id"]))
    assert aws.session.client("sagemaker").list_models()["Models"] == []


def test_without_the_sdk_the_commands_say_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sagemaker", None)  # what `import sagemaker` finds when it is not installed
    assert main(["models", "undeploy", "fusion-m-1"]) == 1
    assert one_line(capsys) == "error: deploying needs the SageMaker Python SDK: pip install 'fusion[deploy]'"


def test_the_gpus_of_an_instance_come_from_the_sdk_table_then_the_price_table():
    deploy._sdk()
    assert deploy.gpu_count("ml.g4dn.12xlarge", REGION) == 4  # the SDK's table
    assert deploy.gpu_count("ml.g5.xlarge", REGION) == 1  # missing there; the price table has it
    assert deploy.gpu_count("ml.g6e.48xlarge", REGION, 8) == 8


def test_a_published_base_model_is_served_from_its_folder_as_it_is_and_an_imported_one_is_refused(aws, server, capsys):
    bucket = aws.env["ARTIFACTS_BUCKET"]
    s3, catalog = aws.session.client("s3"), Catalog(session=aws.session)
    for name, data in EXPORT.items():
        s3.put_object(Bucket=bucket, Key=f"base-models/tiny-llama/{name}", Body=data)
    folder = {"name": "tiny-llama", "parent_id": None, "job_id": None, "status": "ready", "reason": None,
              "family": "llama", "context_length": 2048, "created_at": "2026-01-01T00:00:00.000Z"}
    catalog.register({**folder, "model_id": "hf-tiny-llama", "owner": PUBLIC_OWNER, "kind": "base",
                      "artifact_uri": f"s3://{bucket}/base-models/tiny-llama/"})
    catalog.register({**folder, "model_id": "m-own", "owner": LOCAL_TENANT, "kind": "imported",
                      "artifact_uri": f"s3://{aws.env['DATA_BUCKET']}/{LOCAL_TENANT}/tiny-llama/"})
    assert fusion(server, "deploy", "hf-tiny-llama", "--instance-type", "ml.g4dn.xlarge", "--role", ROLE) == 0
    container = aws.session.client("sagemaker").describe_model(ModelName="fusion-hf-tiny-llama")["PrimaryContainer"]
    assert container["ModelDataSource"]["S3DataSource"]["S3Uri"] == f"s3://{bucket}/base-models/tiny-llama/"
    assert (container["Environment"]["MAX_INPUT_LENGTH"], container["Environment"]["MAX_TOTAL_TOKENS"]) == ("1536", "2048")
    assert permissions.allowed(permissions.resolved_role("EndpointRole"), permissions.Request(
        "s3:GetObject", f"arn:aws:s3:::{bucket}/base-models/tiny-llama/model.safetensors"))
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="base-models/tiny-llama/")["Contents"]] == sorted(
        f"base-models/tiny-llama/{n}" for n in EXPORT)  # nothing unpacked or written beside it
    capsys.readouterr()
    assert fusion(server, "deploy", "m-own", "--instance-type", "ml.g4dn.xlarge", "--role", ROLE) == 1
    assert one_line(capsys).startswith("error: m-own is your own folder, at s3://")


def _aws_answer(status: int, body: dict):
    """A before-call handler answering the way SageMaker does on the wire (JSON 1.1 protocol), read
    by botocore's own parser; the call goes no further (moto never sees it)."""
    headers = {"x-amzn-RequestId": "r-1", "Content-Type": "application/x-amz-json-1.1"}

    def answer(model, **_):
        wire = {"status_code": status, "headers": headers, "body": json.dumps(body).encode()}
        parsed = create_parser(model.metadata["protocol"]).parse(wire, model.output_shape)
        return AWSResponse("https://api.sagemaker.us-east-1.amazonaws.com/", status, headers, None), parsed
    return answer


QUOTA = ("The account-level service limit 'ml.g4dn.xlarge for endpoint usage' is 0 Instances, with current utilization "
         "of 0 Instances and a request delta of 1 Instances. Please use AWS Service Quotas to request an increase for "
         "this quota. If AWS Service Quotas is not available, contact AWS support to request an increase for this quota.")
PASS_ROLE = (f"User: arn:aws:iam::123456789012:user/dev is not authorized to perform: iam:PassRole on resource: {ROLE} "
             "because no identity-based policy allows the iam:PassRole action")
NO_ACCESS = (f"Could not access model data at s3://bucket/hf/. Please ensure that the role \"{ROLE}\" exists and that "
             "its trust relationship policy allows the action \"sts:AssumeRole\" for the service principal "
             "\"sagemaker.amazonaws.com\". Also ensure that the role has \"s3:GetObject\" permissions and that the "
             "object is located in us-east-1.")
FAILED = ("The primary container for production variant AllTraffic did not pass the ping health check. Please check "
          "CloudWatch Logs for this endpoint.")


@pytest.mark.parametrize("operation, status, body, line, left", [
    ("CreateEndpoint", 400, {"__type": "ResourceLimitExceeded", "Message": QUOTA},
     f"error: AWS refused CreateEndpoint: ResourceLimitExceeded: {QUOTA} (request more 'for endpoint usage'", ()),
    ("CreateModel", 400, {"__type": "AccessDeniedException", "Message": PASS_ROLE},
     f"error: AWS refused CreateModel: AccessDeniedException: {PASS_ROLE} (the caller needs", ()),
    ("CreateEndpointConfig", 400, {"__type": "com.amazonaws.sagemaker#ValidationException", "Message": NO_ACCESS},
     f"error: AWS refused CreateEndpointConfig: ValidationException: {NO_ACCESS}", ()),
    ("DescribeEndpoint", 200, {"EndpointStatus": "Failed", "FailureReason": FAILED},
     "error: the endpoint did not come up: Error hosting endpoint", ("model", "endpoint config", "endpoint")),
])
def test_sagemaker_refusals_as_aws_answers_them_are_one_line_and_leave_only_a_failed_endpoint(
        aws, server, capsys, monkeypatch, operation, status, body, line, left):
    model = trained(aws)
    name = deploy.default_endpoint_name(model["model_id"])
    real_session = deploy.session
    created = []

    def session(region):
        sm = real_session(region)
        events = sm.sagemaker_client.meta.events
        events.register("before-call.sagemaker.CreateEndpoint", lambda **_: created.append(name))
        answer = _aws_answer(status, {"EndpointName": name, "EndpointArn": f"arn:aws:sagemaker:{REGION}:123456789012:"
                                      f"endpoint/{name}", "EndpointConfigName": name, "CreationTime": 1.7e9,
                                      "LastModifiedTime": 1.7e9, **body} if status == 200 else body)
        # A described endpoint fails only once it exists: before, the name is checked as free.
        events.register_first(f"before-call.sagemaker.{operation}",
                              lambda **kw: answer(**kw) if status != 200 or created else None)
        return sm

    monkeypatch.setattr(deploy, "session", session)
    assert fusion(server, "deploy", model["model_id"], "--instance-type", "ml.g4dn.xlarge", "--role", ROLE) == 1
    assert one_line(capsys).startswith(line)
    monkeypatch.setattr(deploy, "session", real_session)
    assert deploy._taken(aws.session.client("sagemaker"), name) == list(left)


def test_the_role_to_pass_is_the_stack_output_the_readme_reads():
    from local.sam import transformed

    assert transformed()["Outputs"]["EndpointRoleArn"]["Value"] == {"Fn::GetAtt": ["EndpointRole", "Arn"]}
    guide = (Path(__file__).resolve().parents[2] / "docs" / "deploy.md").read_text()
    serve = guide[guide.index("## Serve a model"):].split("\n## ", 1)[0]
    assert "--role $(out EndpointRoleArn)" in serve and "fusion models undeploy" in serve
