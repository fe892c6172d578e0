"""Each role in template.yaml allows what its code does, and grants little else.

Every test already runs the handlers under their roles (the `roles` fixture of tests/conftest.py);
here one walk through every path of every function, with SageMaker answering through boto3 (so
those calls are checked too), counts the calls checked per function and lists the grants none of
them needed. Writes and deletes that no call needs must not be granted at all. The training role
is checked against the S3, ECR, log and metric access a training job of each type needs.
"""

from __future__ import annotations

import json
import re

import pytest
from botocore.awsrequest import AWSResponse

from functions.api import context
from shared.events import JOB_REQUESTED
from shared.outputs import model_uri, read_progress, split_s3
from shared.state_changes import _definitive
from shared.store import Catalog
from shared.training_jobs import LaunchConfig, training_job_request
from tests import permissions
from tests.conftest import REGION, LambdaContext, deliver, write_metrics
from tests.trust.conftest import dataset_id, launch, reports_uncompressed_model, stored, train, write_progress

# Grants a role may hold although no call of the walk makes them.
WRITES = re.compile(r":(Put|Update|Delete|Create|Stop|Send|Add|Pass|Transact|BatchWrite)", re.I)


def _answer(client, operation: str, parsed: dict | None = None, status: int = 200) -> None:
    """Have the client answer `operation` itself (moto lacks it, or the walk needs a failure)."""
    def reply(**_):
        return AWSResponse("https://sagemaker.local", status, {}, None), parsed or {}
    client.meta.events.register(f"before-call.sagemaker.{operation}", reply)


def _fail_once(client, operation: str, code: str) -> None:
    failing = [code]

    def reply(**_):
        if failing:
            return AWSResponse("https://sagemaker.local", 400, {}, None), {
                "Error": {"Code": failing.pop(), "Message": code}, "ResponseMetadata": {"HTTPStatusCode": 400}}
        return None
    client.meta.events.register(f"before-call.sagemaker.{operation}", reply)


def _with_key(key: str, body: dict) -> tuple[int, dict]:
    from functions.api.app import lambda_handler
    from local.server import api_event

    event = api_event("POST", "/jobs", headers={"content-type": "application/json", "idempotency-key": key},
                      body=json.dumps(body), claims={"sub": "alice"})
    result = lambda_handler(event, LambdaContext())
    return result["statusCode"], json.loads(result["body"])


def _s3_event(bucket: str, key: str) -> dict:
    return {"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
                         "s3": {"bucket": {"name": bucket}, "object": {"key": key, "size": 1}}}]}


def _walk(aws, api) -> None:
    """Every route, the dataset check, launches that start and fail, each end of a job, a requested
    job, and a reconciler pass over a job whose events were all lost."""
    from functions.datasets import app as check
    from functions.events import app as events
    from functions.launcher import app as launcher
    from functions.reconciler import app as reconciler

    status, created = api("POST", "/datasets", body={"name": "walk", "format": "jsonl"})
    assert status == 201
    key = f"alice/datasets/{created['dataset_id']}/data.jsonl"
    aws.session.client("s3").put_object(Bucket=aws.env["DATA_BUCKET"], Key=key,
                                        Body=b"".join(b'{"text": "%d words of training text here"}\n' % i
                                                      for i in range(600)))
    assert check.lambda_handler(_s3_event(aws.env["DATA_BUCKET"], key), LambdaContext())["checked"]
    assert api("GET", "/datasets")[0] == 200 and api("GET", f"/datasets/{created['dataset_id']}")[0] == 200
    assert api("GET", "/models")[0] == 200 and api("GET", "/models/m-alice")[0] == 200
    for name in ("config.json", "hf/model.safetensors"):  # m-alice's files, as its job's upload left them
        aws.session.client("s3").put_object(Bucket=aws.env["ARTIFACTS_BUCKET"],
                                            Key=f"jobs/j0/output/fusion-j0/output/model/{name}", Body=b"{}")
    status, download = api("GET", "/models/m-alice/download")
    assert status == 200 and [f["path"] for f in download["files"]] == ["config.json", "hf/model.safetensors"]
    # A folder with nothing in it: read (each key answers as missing) and registered rejected.
    status, upload = api("POST", "/models/uploads", {"files": [{"name": "config.json", "bytes": 2}]})
    assert status == 201, upload
    status, registered = api("POST", "/models", {"name": "walk", "uri": f"s3://{aws.env['DATA_BUCKET']}/alice/models/none/"})
    assert status == 201 and registered["status"] == "rejected", registered
    assert api("POST", "/jobs/estimate", train())[0] == 200

    ids = []
    for _ in range(6):
        status, job = api("POST", "/jobs", train())
        assert status == 201, job
        ids.append(job["job_id"])
    completed, no_metrics, cancelled_queued, stopped, lost, cancelled_launching = ids
    status, first = _with_key("k-1", train())
    assert status == 201 and _with_key("k-1", train()) == (201, first)
    assert _with_key("k-2", {**train(), "model": "base-none"})[0] == 404  # the key is freed again
    assert api("GET", "/jobs")[0] == 200 and api("GET", f"/jobs/{completed}/metrics")[0] == 200

    sagemaker = launcher._clients()[1]
    _answer(sagemaker, "StopTrainingJob")
    assert launch(completed, no_metrics, stopped, lost, cancelled_launching) == []
    _fail_once(sagemaker, "CreateTrainingJob", "ResourceInUse")
    assert launch(completed, receive_count=2) == []  # a redelivered message finds its training job
    _answer(context.client("sagemaker"), "StopTrainingJob")
    assert api("POST", f"/jobs/{cancelled_launching}/cancel")[1]["status"] == "cancelling"
    assert launch(cancelled_launching, receive_count=2) == []  # cancelled meanwhile: stopped
    # Quota refusal on the last attempt: the launcher marks the job failed.
    status, failing = api("POST", "/jobs", train())
    throttled = [True]

    def refuse(**_):
        if throttled and throttled.pop():
            return AWSResponse("https://sagemaker.local", 400, {}, None), {
                "Error": {"Code": "ResourceLimitExceeded", "Message": "quota"}, "ResponseMetadata": {"HTTPStatusCode": 400}}
        return None
    sagemaker.meta.events.register("before-call.sagemaker.CreateTrainingJob", refuse)
    assert launch(failing["job_id"], receive_count=99) == []
    assert stored(aws, failing["job_id"])["status"] == "failed"

    assert api("POST", f"/jobs/{cancelled_queued}/cancel")[0] == 200
    deliver(aws, completed, "InProgress")
    assert api("GET", f"/jobs/{completed}")[0] == 200  # progress.json not written yet: NoSuchKey, no progress
    write_metrics(aws, stored(aws, completed))
    deliver(aws, completed, "Completed")
    deliver(aws, no_metrics, "InProgress", "Completed")
    deliver(aws, stopped, "InProgress")
    assert api("POST", f"/jobs/{stopped}/cancel")[0] == 200
    write_progress(aws, stopped, 1000)
    deliver(aws, stopped, "Stopped")
    assert [stored(aws, j)["status"] for j in (completed, no_metrics, cancelled_queued, stopped)] == [
        "completed", "failed", "cancelled", "cancelled"]

    requested = events.lambda_handler({"id": "walk-1", "detail-type": JOB_REQUESTED, "source": "pipeline",
                                       "detail": {"owner": "alice", "request": train()}}, LambdaContext())
    assert requested["accepted"]

    # Two tunings on the tuner: one cancelled (its Stopped event reads and bills its trials), one
    # whose events were lost (the reconciler ends it).
    tuning = {"model": "base-debug", "dataset": train()["dataset"], "max_trials": 2,
              "settings": {"seq_len": 64, "steps_per_cycle": 100}, "ranges": {"lr": {"min": 1e-4, "max": 1e-3}}}
    tunings = [api("POST", "/tunings", tuning)[1]["tuning_id"] for _ in range(2)]
    assert api("GET", "/tunings")[0] == 200 and api("GET", f"/tunings/{tunings[0]}")[0] == 200
    _answer(sagemaker, "CreateHyperParameterTuningJob", {"HyperParameterTuningJobArn": "arn:tuning"})
    assert launch(*tunings) == []
    _answer(context.client("sagemaker"), "StopHyperParameterTuningJob")
    assert api("POST", f"/tunings/{tunings[0]}/cancel")[1]["status"] == "cancelling"
    _answer(sagemaker, "DescribeHyperParameterTuningJob", {"HyperParameterTuningJobStatus": "InProgress"})
    _answer(sagemaker, "StopHyperParameterTuningJob")
    assert launch(tunings[0], receive_count=2) == []  # cancelled meanwhile: the launcher stops the tuner
    trials = {"TrainingJobSummaries": [
        {"TrainingJobName": f"fusion-{tunings[0]}-001-aaaaaaaa", "TrainingJobArn": "arn:t1", "CreationTime": 0,
         "TrainingJobStatus": "Completed", "TunedHyperParameters": {"lr": "0.0003"},
         "FinalHyperParameterTuningJobObjectiveMetric": {"MetricName": "heldout_perplexity", "Value": 30.0}},
        {"TrainingJobName": f"fusion-{tunings[0]}-002-bbbbbbbb", "TrainingJobArn": "arn:t2", "CreationTime": 0,
         "TrainingJobStatus": "Stopped", "TunedHyperParameters": {"lr": "0.0001"}}]}
    follower = events._clients()["sagemaker"]
    _answer(follower, "ListTrainingJobsForHyperParameterTuningJob", trials)
    _answer(follower, "DescribeTrainingJob", {"FinalMetricDataList": [{"MetricName": "step", "Value": 3.0}]})
    ended = events.lambda_handler({"id": "t-1", "detail-type": "SageMaker HyperParameter Tuning Job State Change",
                                   "source": "aws.sagemaker", "detail": {
                                       "HyperParameterTuningJobName": f"fusion-{tunings[0]}",
                                       "HyperParameterTuningJobStatus": "Stopped"}}, LambdaContext())
    assert ended["status"] == "cancelled"
    assert api("POST", f"/tunings/{tunings[0]}/promote", {})[0] == 201

    reconciler._clients.cache_clear()
    tuner = reconciler._clients()["sagemaker"]
    _answer(tuner, "DescribeHyperParameterTuningJob", {"HyperParameterTuningJobName": f"fusion-{tunings[1]}",
                                                      "HyperParameterTuningJobStatus": "Completed"})
    _answer(tuner, "ListTrainingJobsForHyperParameterTuningJob", {"TrainingJobSummaries": []})
    from moto.sagemaker.models import sagemaker_backends

    reports_uncompressed_model(sagemaker_backends["123456789012"][REGION].training_jobs[stored(aws, lost)["training_job_name"]])
    write_metrics(aws, stored(aws, lost))
    summary = reconciler.lambda_handler({}, LambdaContext())
    assert lost in summary["moved"] and stored(aws, lost)["status"] == "completed"
    assert tunings[1] in summary["moved"] and stored(aws, tunings[1])["status"] == "completed"

    # an operator: every tenant's spend, then a tenant's budget
    from functions.admin import app as admin
    from local.server import api_event
    from shared.admin import ADMIN_GROUP, GROUPS_CLAIM

    admin._tenants.cache_clear()
    operator = {"sub": "ops", GROUPS_CLAIM: f"[{ADMIN_GROUP}]"}
    for method, path, body in (("GET", "/admin/tenants", None), ("PUT", "/admin/tenants/bob/budget", '{"budget_usd": "5"}')):
        event = api_event(method, path, headers={"content-type": "application/json"}, body=body, claims=operator)
        assert admin.lambda_handler(event, LambdaContext())["statusCode"] == 200
    admin._tenants.cache_clear()
    made = stored(aws, completed)["output_model_id"]  # deleting removes its files and keeps its record
    from shared.hf import export_manifest, export_prefix
    from shared.outputs import split_s3

    s3 = aws.session.client("s3")
    bucket, key = split_s3(stored(aws, completed)["artifact_uri"])
    for name in ("config.json", "hf/config.json", "metrics.json"):
        s3.put_object(Bucket=bucket, Key=key + name, Body=b"{}")
    assert api("DELETE", f"/models/{made}")[1]["status"] == "deleted"
    assert s3.list_objects_v2(Bucket=bucket, Prefix=key)["KeyCount"] == 0
    # A model archived before outputs were uncompressed: its archive and the folder a deploy unpacked.
    archived = {**Catalog(session=aws.session).get(made, "alice"), "model_id": "m-archived", "status": "ready",
                "artifact_uri": f"s3://{bucket}/jobs/j9/output/fusion-j9/output/model.tar.gz"}
    archived.pop("deleted_at", None)
    Catalog(session=aws.session).register(archived)
    key = split_s3(archived["artifact_uri"])[1]
    unpacked = export_prefix(key)
    for name in (key, unpacked + "config.json", export_manifest(unpacked)):
        s3.put_object(Bucket=bucket, Key=name, Body=b"{}")
    assert api("GET", "/models/m-archived/download")[1]["url"].split("?")[0].endswith(key)
    assert api("DELETE", "/models/m-archived")[1]["status"] == "deleted"
    assert s3.list_objects_v2(Bucket=bucket, Prefix="jobs/j9/")["KeyCount"] == 0
    assert api("DELETE", f"/datasets/{created['dataset_id']}")[1]["status"] == "deleted"


@pytest.mark.slow
def test_every_call_of_every_function_is_allowed_and_the_unused_grants_are_listed(tenants, api, roles, capsys):
    from functions.launcher import app as launcher
    from functions.reconciler import app as reconciler

    launcher._clients.cache_clear()
    reconciler._clients.cache_clear()
    context.reset()
    try:
        _walk(tenants, api)
    finally:
        launcher._clients.cache_clear()
        reconciler._clients.cache_clear()
        context.reset()
    assert not roles.denied(), [(c.function, c.denied) for c in roles.denied()]
    counts, requests = roles.counts(), roles.requests()
    functions = sorted(permissions.function_roles(permissions.transformed()))
    report = ["calls checked against each role:"]
    unused_writes = {}
    for function in functions:
        unused = permissions.unused_grants(function, requests.get(function, []))
        report.append(f"  {function}: {counts[function]} calls, {len(requests.get(function, []))} IAM requests; "
                      f"unused grants: {', '.join(f'{a} on {r}' for a, r in unused) or 'none'}")
        unused_writes[function] = [(a, r) for a, r in unused if WRITES.search(a)]
    with capsys.disabled():
        print("\n" + "\n".join(report))
    assert all(counts[f] > 0 for f in functions), counts
    assert unused_writes == {f: [] for f in functions}


def _training_requests(aws, job: dict) -> list[permissions.Request]:
    """What SageMaker does with the training role for one job: pull the image, read each input
    channel (list its prefix, get its objects), write the model and output files (uncompressed) and the
    checkpoints (and read them back on a spot restart), log and publish metrics."""
    request = training_job_request(job, LaunchConfig(
        artifacts_bucket=aws.env["ARTIFACTS_BUCKET"], training_image_uri=aws.env["TRAINING_IMAGE_URI"],
        role_arn=aws.env["SAGEMAKER_ROLE_ARN"]))
    s3 = "arn:aws:s3:::"
    out = []
    for channel in request["InputDataConfig"]:
        bucket, key = split_s3(channel["DataSource"]["S3DataSource"]["S3Uri"])
        out += [permissions.Request("s3:ListBucket", s3 + bucket, (("s3:prefix", key),)),
                permissions.Request("s3:GetObject", f"{s3}{bucket}/{key}")]
    # CompressionType NONE: /opt/ml/model and /opt/ml/output/data uploaded file by file
    assert request["OutputDataConfig"]["CompressionType"] == "NONE"
    bucket, prefix = split_s3(model_uri(request["OutputDataConfig"]["S3OutputPath"], request["TrainingJobName"]))
    for name in ("config.json", "hf/model.safetensors", "metrics.json"):
        out.append(permissions.Request("s3:PutObject", f"{s3}{bucket}/{prefix}{name}"))
    out.append(permissions.Request("s3:PutObject", f"{s3}{bucket}/{prefix.removesuffix('model/')}data/metrics.json"))
    bucket, prefix = split_s3(request["CheckpointConfig"]["S3Uri"])
    for action in ("s3:PutObject", "s3:GetObject"):
        out.append(permissions.Request(action, f"{s3}{bucket}/{prefix}progress.json"))
    out.append(permissions.Request("s3:ListBucket", s3 + bucket, (("s3:prefix", prefix),)))
    registry, repository = request["AlgorithmSpecification"]["TrainingImage"].split(":")[0].split("/", 1)
    account, region = registry.split(".")[0], registry.split(".")[3]
    image = f"arn:aws:ecr:{region}:{account}:repository/{repository}"
    out += [permissions.Request(a, image) for a in ("ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer",
                                                      "ecr:BatchCheckLayerAvailability")]
    out.append(permissions.Request("ecr:GetAuthorizationToken", "*"))
    group = f"arn:aws:logs:{region}:{account}:log-group:/aws/sagemaker/TrainingJobs"
    out += [permissions.Request("logs:CreateLogGroup", group),  # the first job of an account creates it
            permissions.Request("logs:CreateLogStream", f"{group}:log-stream:{request['TrainingJobName']}/algo-1"),
            permissions.Request("logs:PutLogEvents", f"{group}:log-stream:{request['TrainingJobName']}/algo-1"),
            permissions.Request("cloudwatch:PutMetricData", "*", (("cloudwatch:namespace", "/aws/sagemaker/TrainingJobs"),))]
    return out


def test_the_training_role_allows_what_a_training_job_reads_and_writes_and_no_delete(tenants, api, capsys):
    statements = permissions.resolved_role("SageMakerExecutionRole")
    status, job = api("POST", "/jobs", train())
    assert status == 201
    contract = {"type": "contract", "dataset": dataset_id("alice"),
                "hyperparams": {"source_model_id": "m-alice", "num_layers_to_contract": 1}}
    status, contract_job = api("POST", "/jobs", contract)
    assert status == 201, contract_job
    requests = []
    for job_id in (job["job_id"], contract_job["job_id"]):
        requests += _training_requests(tenants, stored(tenants, job_id))
    denied = [r for r in requests if not permissions.allowed(statements, r)]
    assert denied == []
    unused = permissions.unused_grants_of(statements, requests)
    with capsys.disabled():
        print(f"\nSageMakerExecutionRole: {len(requests)} requests of a train and a contract job checked; "
              f"unused grants: {', '.join(f'{a} on {r}' for a, r in unused) or 'none'}")
    assert not [a for a, _ in unused if WRITES.search(a)]
    assert not any("Delete" in str(s["Action"]) for s in statements)


def test_a_missing_key_answered_access_denied_reads_as_missing(tenants):
    """What S3 answers a caller without s3:ListBucket: no progress yet, and metrics gone for good."""
    from botocore.stub import Stubber

    s3 = tenants.session.client("s3")
    with Stubber(s3) as stub:
        stub.add_client_error("get_object", service_error_code="AccessDenied", http_status_code=403)
        assert read_progress(s3, tenants.env["ARTIFACTS_BUCKET"], "j1") is None
    with Stubber(s3) as stub:
        stub.add_client_error("get_object", service_error_code="SlowDown", http_status_code=503)
        with pytest.raises(Exception, match="SlowDown"):
            read_progress(s3, tenants.env["ARTIFACTS_BUCKET"], "j1")
    from botocore.exceptions import ClientError

    denied = ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "GetObject")
    throttled = ClientError({"Error": {"Code": "SlowDown", "Message": "slow"}}, "GetObject")
    assert _definitive(denied) and not _definitive(throttled)


def test_the_functions_reach_this_stacks_sagemaker_jobs_alone(tenants):
    """Every grant on training and tuning jobs is conditioned on the stack's tag: created only with
    it, described and stopped only when the job carries it or does not exist (ResourceNotFound, which
    the launcher and the reconciler read), never another stack's job of the same name prefix."""
    from shared.training_jobs import STACK_TAG

    region, ours = "us-east-1", permissions.pseudo_parameters("us-east-1")["AWS::StackName"]
    launcher = permissions.statements_of("LauncherFunction", region)
    for function in ("ApiFunction", "LauncherFunction", "EventsFunction", "ReconcilerFunction"):
        for statement in permissions.statements_of(function, region):
            if any(":training-job/" in str(r) or ":hyper-parameter-tuning-job/" in str(r)
                   for r in permissions._listed(statement["Resource"])):
                (_, tests), = statement["Condition"].items()
                assert set(tests) <= {f"aws:ResourceTag/{STACK_TAG}", f"aws:RequestTag/{STACK_TAG}"}, statement
                assert set(tests.values()) == {ours}, statement

    def allowed(operation: str, params: dict) -> bool:
        requests = permissions.requests_of("sagemaker", operation, params, region)
        return all(permissions.allowed(launcher, r) for r in requests if r.action.startswith("sagemaker:"))

    def create(name: str, stack: str | None) -> dict:
        tags = [{"Key": "fusion:job-id", "Value": name}] + ([{"Key": STACK_TAG, "Value": stack}] if stack else [])
        return {"TrainingJobName": name, "RoleArn": "r", "Tags": tags}

    assert allowed("CreateTrainingJob", create("fusion-j-ours", ours))
    assert not allowed("CreateTrainingJob", create("fusion-j-untagged", None))
    permissions.requests_of("sagemaker", "CreateTrainingJob", create("fusion-j-theirs", "fusion-other"), region)
    for operation in ("DescribeTrainingJob", "StopTrainingJob"):
        assert allowed(operation, {"TrainingJobName": "fusion-j-ours"})
        assert allowed(operation, {"TrainingJobName": "fusion-j-never-created"})
        assert not allowed(operation, {"TrainingJobName": "fusion-j-theirs"})
