"""The local SageMaker: its API errors, the /opt/ml layout it gives the trainer, and what it uploads."""

from __future__ import annotations

import io
import json
import sys
import tarfile
import textwrap
import time

import boto3
import pytest
from botocore.exceptions import ClientError
from moto.server import ThreadedMotoServer

from local.sagemaker import LocalSageMaker

# A stand-in for the training image's entry point: it records what it was given and behaves
# as the hyperparameter "mode" says.
TRAINER = textwrap.dedent('''
    import json, os, pathlib, signal, sys, time
    root = pathlib.Path(os.environ["FUSION_ML_ROOT"])
    hp = json.loads((root / "input/config/hyperparameters.json").read_text())
    seen = sorted(p.relative_to(root).as_posix() for p in (root / "input").rglob("*") if p.is_file())
    (root / "output/data/threads").write_text(os.environ.get("OMP_NUM_THREADS", ""))
    (root / "output/data/seen.json").write_text(json.dumps(seen))
    (root / "checkpoints/progress.json").write_text(json.dumps({"step": 1}))
    print("step=1 train_loss=2.5", flush=True)
    if hp["mode"] == "fail":
        (root / "output/failure").write_text("dataset has no text records")
        sys.exit(1)
    if hp["mode"] == "crash":
        raise SystemExit("boom")
    if hp["mode"] == "oom":  # what the kernel's out-of-memory killer does
        os.kill(os.getpid(), signal.SIGKILL)
    if hp["mode"] == "hang":
        signal.signal(signal.SIGTERM, lambda *a: (print("checkpointed on SIGTERM", flush=True), sys.exit(0)))
        while True:
            time.sleep(0.1)
    (root / "checkpoints/progress.json").write_text(json.dumps({"step": 2}))
    (root / "model/config.json").write_text("{}")
    (root / "model/hf").mkdir()
    (root / "model/hf/model.safetensors").write_bytes(b"weights")
    print("step=2 train_loss=1.5", flush=True)
''')


@pytest.fixture(scope="module")
def moto_url():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    yield "http://127.0.0.1:%d" % server.get_host_and_port()[1]
    server.stop()
    server._server.server_close()


@pytest.fixture
def local(moto_url, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3 = boto3.client("s3", endpoint_url=moto_url)
    bucket = f"b{time.monotonic_ns()}"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="t/datasets/ds/data.jsonl", Body=b'{"text": "hi"}\n')
    s3.put_object(Bucket=bucket, Key="base/model.tar.gz", Body=b"tar")
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    events: list[dict] = []
    service = LocalSageMaker(lambda: s3, tmp_path / "runs", events.append,
                             train_command=[sys.executable, str(script)], stop_grace_seconds=5)
    url = service.start()
    client = boto3.client("sagemaker", endpoint_url=url)
    yield client, s3, bucket, events, service
    service.close()


def _request(bucket: str, name: str, mode: str) -> dict:
    channel = lambda n, uri: {"ChannelName": n, "DataSource": {"S3DataSource": {  # noqa: E731
        "S3DataType": "S3Prefix", "S3Uri": uri, "S3DataDistributionType": "FullyReplicated"}}}
    return {
        "TrainingJobName": name,
        "HyperParameters": {"mode": mode, "job_type": "train"},
        "AlgorithmSpecification": {"TrainingImage": "img", "TrainingInputMode": "File",
                                   "MetricDefinitions": [{"Name": "train_loss", "Regex": "train_loss=([0-9.]+)"}]},
        "RoleArn": "arn:aws:iam::123456789012:role/r",
        "InputDataConfig": [channel("training", f"s3://{bucket}/t/datasets/ds/data.jsonl"),
                            channel("model", f"s3://{bucket}/base/model.tar.gz")],
        "OutputDataConfig": {"S3OutputPath": f"s3://{bucket}/jobs/j/output/"},
        "CheckpointConfig": {"S3Uri": f"s3://{bucket}/jobs/j/checkpoints/"},
        "ResourceConfig": {"InstanceType": "ml.g5.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 50},
        "StoppingCondition": {"MaxRuntimeInSeconds": 3600},
    }


def _untar(s3, bucket: str, key: str) -> dict[str, bytes]:
    data = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_completed_job_lays_out_opt_ml_and_uploads(local):
    client, s3, bucket, events, service = local
    arn = client.create_training_job(**_request(bucket, "fusion-ok", "ok"))["TrainingJobArn"]
    assert arn.endswith("training-job/fusion-ok")
    assert service.wait("fusion-ok", 30) == "Completed"
    job = client.describe_training_job(TrainingJobName="fusion-ok")
    assert job["ModelArtifacts"]["S3ModelArtifacts"] == f"s3://{bucket}/jobs/j/output/fusion-ok/output/model.tar.gz"
    assert {m["MetricName"]: m["Value"] for m in job["FinalMetricDataList"]} == {"train_loss": 1.5}
    assert _untar(s3, bucket, "jobs/j/output/fusion-ok/output/model.tar.gz") == {
        "config.json": b"{}", "hf/model.safetensors": b"weights"}
    seen = json.loads(_untar(s3, bucket, "jobs/j/output/fusion-ok/output/output.tar.gz")["seen.json"])
    assert seen == ["input/config/hyperparameters.json", "input/config/inputdataconfig.json",
                    "input/config/resourceconfig.json", "input/data/model/model.tar.gz",
                    "input/data/training/data.jsonl"]
    progress = s3.get_object(Bucket=bucket, Key="jobs/j/checkpoints/progress.json")["Body"].read()
    assert json.loads(progress) == {"step": 2}
    assert [e["detail"]["TrainingJobStatus"] for e in events] == ["InProgress", "Completed"]
    assert events[0]["detail-type"] == "SageMaker Training Job State Change" and events[0]["source"] == "aws.sagemaker"


def test_uncompressed_output_is_files_under_the_model_prefix(local):
    """CompressionType NONE, as SageMaker does it: /opt/ml/model and /opt/ml/output/data land file by
    file (paths kept), no archive is made, and the model artifact is the prefix output/model/. A
    later job given that prefix as its model channel gets the files as they were."""
    client, s3, bucket, events, service = local
    request = _request(bucket, "fusion-flat", "ok")
    request["OutputDataConfig"]["CompressionType"] = "NONE"
    client.create_training_job(**request)
    assert service.wait("fusion-flat", 30) == "Completed"
    prefix = "jobs/j/output/fusion-flat/output/"
    model = f"s3://{bucket}/{prefix}model/"
    assert client.describe_training_job(TrainingJobName="fusion-flat")["ModelArtifacts"]["S3ModelArtifacts"] == model
    assert events[-1]["detail"]["ModelArtifacts"]["S3ModelArtifacts"] == model
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"])
    assert keys == [f"{prefix}data/seen.json", f"{prefix}data/threads", f"{prefix}model/config.json",
                    f"{prefix}model/hf/model.safetensors"]
    assert s3.get_object(Bucket=bucket, Key=f"{prefix}model/hf/model.safetensors")["Body"].read() == b"weights"

    later = _request(bucket, "fusion-later", "ok")
    later["InputDataConfig"][1]["DataSource"]["S3DataSource"]["S3Uri"] = model
    client.create_training_job(**later)
    assert service.wait("fusion-later", 30) == "Completed", events[-1]["detail"].get("FailureReason")
    seen = json.loads(_untar(s3, bucket, "jobs/j/output/fusion-later/output/output.tar.gz")["seen.json"])
    assert "input/data/model/config.json" in seen and "input/data/model/hf/model.safetensors" in seen


def test_unknown_compression_type_is_refused(local):
    client, _, bucket, _, _ = local
    request = _request(bucket, "fusion-zip", "ok")
    request["OutputDataConfig"]["CompressionType"] = "ZIP"
    with pytest.raises(ClientError) as refused:
        client.create_training_job(**request)
    assert refused.value.response["Error"]["Code"] == "ValidationException"


def test_duplicate_name_is_resource_in_use_and_unknown_is_validation(local):
    client, _, bucket, _, service = local
    client.create_training_job(**_request(bucket, "fusion-dup", "ok"))
    with pytest.raises(ClientError) as duplicate:
        client.create_training_job(**_request(bucket, "fusion-dup", "ok"))
    assert duplicate.value.response["Error"]["Code"] == "ResourceInUse"
    with pytest.raises(ClientError) as missing:
        client.describe_training_job(TrainingJobName="fusion-nope")
    assert missing.value.response["Error"]["Code"] == "ValidationException"
    service.wait("fusion-dup", 30)
    with pytest.raises(ClientError) as ended:
        client.stop_training_job(TrainingJobName="fusion-dup")
    assert ended.value.response["Error"]["Code"] == "ValidationException"
    names = [s["TrainingJobName"] for s in client.list_training_jobs(StatusEquals="Completed")["TrainingJobSummaries"]]
    assert names == ["fusion-dup"]


@pytest.mark.parametrize(("mode", "reason"), [
    ("fail", "AlgorithmError: dataset has no text records"),
    ("crash", "AlgorithmError: ExecuteUserScriptError: the train entry point exited with code 1"),
])
def test_failed_trainer_reports_its_reason(local, mode, reason):
    client, s3, bucket, events, service = local
    client.create_training_job(**_request(bucket, f"fusion-{mode}", mode))
    assert service.wait(f"fusion-{mode}", 30) == "Failed"
    assert events[-1]["detail"]["TrainingJobStatus"] == "Failed"
    assert events[-1]["detail"]["FailureReason"].startswith(reason)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"jobs/j/output/fusion-{mode}/")["Contents"]]
    assert keys == [f"jobs/j/output/fusion-{mode}/output/output.tar.gz"]


def test_missing_input_fails_like_sagemaker(local):
    client, _, bucket, events, service = local
    request = _request(bucket, "fusion-noinput", "ok")
    request["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"] = f"s3://{bucket}/t/datasets/missing/"
    client.create_training_job(**request)
    assert service.wait("fusion-noinput", 30) == "Failed"
    assert events[-1]["detail"]["FailureReason"].startswith("ClientError: No S3 objects found")


def test_stop_sends_sigterm_and_ends_stopped(local):
    client, _, bucket, events, service = local
    client.create_training_job(**_request(bucket, "fusion-hang", "hang"))
    deadline = time.monotonic() + 20
    while not (service.work_dir / "fusion-hang/output/data/seen.json").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    client.stop_training_job(TrainingJobName="fusion-hang")
    assert service.wait("fusion-hang", 20) == "Stopped"
    assert [e["detail"]["TrainingJobStatus"] for e in events] == ["InProgress", "Stopping", "Stopped"]
    assert "checkpointed on SIGTERM" in (service.work_dir / "fusion-hang/train.log").read_text()


def test_a_trainer_the_kernel_killed_is_named_out_of_memory(local):
    client, _, bucket, events, service = local
    client.create_training_job(**_request(bucket, "fusion-oom", "oom"))
    assert service.wait("fusion-oom", 30) == "Failed"
    reason = events[-1]["detail"]["FailureReason"]
    assert reason.startswith("AlgorithmError: OutOfMemory: the train entry point was killed (SIGKILL)")
    assert "out-of-memory killer" in reason and "GiB" in reason


def _started(service, name: str, timeout: float = 20) -> str:
    """The OMP_NUM_THREADS the job's trainer got, once it started."""
    deadline = time.monotonic() + timeout
    while not (service.work_dir / f"{name}/output/data/seen.json").exists():
        assert time.monotonic() < deadline, f"{name} did not start"
        time.sleep(0.05)
    return (service.work_dir / f"{name}/output/data/threads").read_text()


def test_jobs_start_only_while_memory_holds_them_and_share_the_cores(local, monkeypatch):
    client, _, bucket, _, service = local
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # inherited by the stack: no job gets it
    service.cores = 4
    client.create_training_job(**_request(bucket, "fusion-first", "hang"))
    client.create_training_job(**_request(bucket, "fusion-second", "hang"))
    assert {_started(service, "fusion-first"), _started(service, "fusion-second")} == {"4", "2"}  # room for both
    for name in ("fusion-first", "fusion-second"):
        client.stop_training_job(TrainingJobName=name)
        service.wait(name, 20)

    service.memory_bytes = 1  # room for one job only (one always may run)
    client.create_training_job(**_request(bucket, "fusion-alone", "hang"))
    assert _started(service, "fusion-alone") == "4"
    client.create_training_job(**_request(bucket, "fusion-waits", "hang"))
    time.sleep(1.5)
    assert not (service.work_dir / "fusion-waits/output/data/seen.json").exists()
    assert client.describe_training_job(TrainingJobName="fusion-waits")["TrainingJobStatus"] == "InProgress"
    client.stop_training_job(TrainingJobName="fusion-alone")
    assert service.wait("fusion-alone", 20) == "Stopped"
    assert _started(service, "fusion-waits") == "4"
    client.stop_training_job(TrainingJobName="fusion-waits")
    assert service.wait("fusion-waits", 20) == "Stopped"


def test_a_job_needs_the_memory_its_model_trains_in(tmp_path):
    from local.sagemaker import CPU_MEMORY_BASE, job_memory_bytes
    from shared.memory import bytes_per_gpu
    from shared.shapes import SIZES, grown_config

    root = tmp_path / "run"
    (root / "input/config").mkdir(parents=True)
    (root / "input/data/model").mkdir(parents=True)
    assert job_memory_bytes(root) == CPU_MEMORY_BASE  # nothing readable: the fixed part
    (root / "input/config/hyperparameters.json").write_text(json.dumps(
        {"job_type": "train", "seq_len": "256", "micro_batch": "16"}))
    (root / "input/data/model/config.json").write_text(SIZES["small"].model_dump_json())
    plan = bytes_per_gpu(grown_config(SIZES["small"]), seq_len=256, micro_batch=16, strategy="ddp", world_size=1,
                         checkpointing=False)
    need = job_memory_bytes(root)
    assert need > plan.total and 8 << 30 < need < 12 << 30  # grown small peaked near 10 GB on a CPU
