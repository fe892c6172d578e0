"""Faults injected on every path: launch throttling and quotas, DynamoDB conditional failures and
throttling, a trainer killed mid-cycle, corrupt and empty datasets, a NaN loss. Each ends in a
defined state with a clear reason, and no job or model record is lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from botocore.exceptions import ClientError

from shared.state_changes import model_id_for
from shared.store import Catalog, ConditionFailed, Jobs
from shared.training_jobs import training_job_name

from tests.conftest import artifact, client_error, deliver, put_metrics, write_metrics

from .conftest import launch, stored, train

DEFINED = {"queued", "launching", "running", "cancelling", "completed", "failed", "cancelled"}


@pytest.fixture
def faults():
    """The faults a case injected: every case must inject at least one, or it tests the happy path."""
    injected: list[str] = []
    yield injected
    assert injected, "the case injected no fault"


@pytest.fixture
def created(aws, faults):
    """The jobs a case created; afterwards each must still be there, in a defined state, with a
    reason if it failed and its model in the catalog if it completed."""
    ids: list[str] = []
    yield ids
    catalog = Catalog(session=aws.session)
    lost = []
    for job_id in ids:
        job = Jobs(session=aws.session).get(job_id)
        if job is None or job["status"] not in DEFINED:
            lost.append(f"job {job_id}")
        elif job["status"] == "failed" and not job["failure_reason"]:
            lost.append(f"reason of {job_id}")
        elif job["status"] == "completed" and catalog.get(job["output_model_id"], "alice") is None:
            lost.append(f"model of {job_id}")
    print(f"\nfaults injected: {', '.join(faults)}; lost: {len(lost)}")
    assert lost == []


@pytest.fixture
def api(api, created):
    def call(method, path, body=None, **kwargs):
        status, answer = api(method, path, body, **kwargs)
        if method == "POST" and path == "/jobs" and status == 201:
            created.append(answer["job_id"])
        return status, answer

    return call


def _create(api, **hyper):
    status, job = api("POST", "/jobs", train(**hyper))
    assert status == 201, job
    return job


@pytest.mark.parametrize("code", ["ThrottlingException", "ResourceLimitExceeded", "CapacityError"])
def test_launch_limits_keep_the_job_queued_then_launch_it(faults, tenants, api, sagemaker, code):
    job = _create(api)
    sagemaker.errors += [client_error(code, "limit")] * 2
    faults.extend([code] * 2)
    assert launch(job["job_id"], receive_count=1) == ["msg-0"]
    assert launch(job["job_id"], receive_count=2) == ["msg-0"]
    assert stored(tenants, job["job_id"])["status"] == "launching"  # taken, not lost, not failed
    assert launch(job["job_id"], receive_count=3) == []
    assert list(sagemaker.created) == [training_job_name(job["job_id"])]


def test_launch_limits_past_the_last_attempt_fail_the_job_with_the_reason(faults, tenants, api, sagemaker,
                                                                           monkeypatch):
    monkeypatch.setenv("FUSION_MAX_LAUNCH_ATTEMPTS", "2")
    job = _create(api)
    sagemaker.errors += [client_error("ResourceLimitExceeded", "ml.g5.xlarge quota is 0")] * 2
    faults.extend(["ResourceLimitExceeded"] * 2)
    launch(job["job_id"], receive_count=1)
    assert launch(job["job_id"], receive_count=2) == []
    ended = stored(tenants, job["job_id"])
    assert ended["status"] == "failed" and ended["bill"] == "0.00"
    assert "after 2 attempts" in ended["failure_reason"] and "quota is 0" in ended["failure_reason"]


def test_a_conditional_write_lost_to_a_concurrent_writer_decides_again(faults, tenants, api, sagemaker,
                                                                       monkeypatch):
    """The launcher's queued -> launching write loses to a cancel that landed first."""
    job = _create(api)
    jobs = Jobs(session=tenants.session)
    real = Jobs.transition
    calls = []

    def racing(self, job_id, status, **fields):
        if not calls:
            calls.append(status)
            jobs.annotate(job_id, ("queued",), status="cancelled", bill="0.00", failure_reason="cancelled before launch")
            raise ConditionFailed(job_id)
        return real(self, job_id, status, **fields)

    monkeypatch.setattr(Jobs, "transition", racing)
    faults.append("ConditionalCheckFailed")
    assert launch(job["job_id"]) == []
    assert sagemaker.created == {} and stored(tenants, job["job_id"])["status"] == "cancelled"


def test_dynamodb_conditional_and_throttling_failures_on_events_change_nothing_twice(faults, tenants, api, sagemaker,
                                                                                     monkeypatch):
    job = _create(api)
    launch(job["job_id"])
    write_metrics(tenants, stored(tenants, job["job_id"]))
    real = Jobs.transition
    failures = [client_error("ProvisionedThroughputExceededException", "slow down", "UpdateItem"),
                client_error("ConditionalCheckFailedException", "lost", "UpdateItem")]

    def flaky(self, job_id, status, **fields):
        if failures:
            error = failures.pop(0)
            if error.response["Error"]["Code"] == "ConditionalCheckFailedException":
                raise ConditionFailed(job_id) from error
            raise error
        return real(self, job_id, status, **fields)

    monkeypatch.setattr(Jobs, "transition", flaky)
    faults.extend(["ProvisionedThroughputExceeded", "ConditionalCheckFailed"])
    with pytest.raises(ClientError):
        deliver(tenants, job["job_id"], "Completed")  # EventBridge retries it
    assert deliver(tenants, job["job_id"], "Completed") == [{"changed": False}]  # lost the race: no-op
    deliver(tenants, job["job_id"], "Completed")
    ended = stored(tenants, job["job_id"])
    assert ended["status"] == "completed" and ended["bill"] == job["estimate"]["total"]
    assert Catalog(session=tenants.session).get(model_id_for(job["job_id"]), "alice") is not None


def test_completed_without_metrics_or_with_corrupt_metrics_fails_with_the_artifact_kept(
        faults, tenants, api, sagemaker):
    missing, corrupt = _create(api), _create(api)
    launch(missing["job_id"], corrupt["job_id"])
    put_metrics(tenants, corrupt["job_id"], b"\x1f\x8b not metrics")
    faults.extend(["metrics.json missing", "metrics.json corrupt"])
    for job in (missing, corrupt):
        deliver(tenants, job["job_id"], "Completed", "Completed")
        ended = stored(tenants, job["job_id"])
        assert ended["status"] == "failed" and "metrics.json could not be read" in ended["failure_reason"]
        assert ended["artifact_uri"] == artifact(tenants, job["job_id"]) in ended["failure_reason"]


def test_a_corrupt_or_empty_dataset_is_rejected_and_cannot_be_trained_on(faults, tenants, api):
    from functions.datasets import app as check
    from tests.conftest import LambdaContext

    s3 = tenants.session.client("s3")
    for body, fault in ((b"\xff\xfe{not json\n", "corrupt dataset"), (b"", "empty dataset")):
        status, dataset = api("POST", "/datasets", {"name": fault.replace(" ", "-"), "format": "jsonl"})
        assert status == 201, dataset
        key = dataset["s3_uri"].split("/", 3)[3]
        s3.put_object(Bucket=tenants.env["DATA_BUCKET"], Key=key, Body=body)
        faults.append(fault)
        check.lambda_handler({"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
                                           "s3": {"bucket": {"name": tenants.env["DATA_BUCKET"]},
                                                  "object": {"key": key, "size": len(body)}}}]}, LambdaContext())
        status, checked = api("GET", f"/datasets/{dataset['dataset_id']}")
        assert checked["status"] == "rejected" and checked["reason"]
        status, refused = api("POST", "/jobs", {**train(), "dataset": dataset["dataset_id"]})
        assert status == 422 and "rejected, not ready" in refused["error"]["message"]


# --- the trainer itself: the real `train` entry point on the debug size ------------------------


@pytest.fixture(scope="module")
def base_model_dir(tmp_path_factory) -> Path:
    from shared.shapes import SIZES
    from training_image.data import stdlib_corpus
    from training_image.model import Decoder
    from training_image.modeldir import save_model_dir
    from training_image.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("base")
    corpus = stdlib_corpus(120_000)
    save_model_dir(root / "model", Decoder(SIZES["debug"]).init_weights(0), train_tokenizer(corpus, SIZES["debug"].vocab_size))
    (root / "corpus.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in corpus) + "\n")
    return root


def _ml_root(tmp_path: Path, base: Path, job: dict, sagemaker, data: bytes | None = None) -> Path:
    """An /opt/ml tree for a launched job: the hyperparameters its launch sent, the debug base model, the data."""
    root = tmp_path / "ml"
    (root / "input/config").mkdir(parents=True)
    (root / "input/data/training").mkdir(parents=True)
    (root / "input/data/model").symlink_to(base / "model")
    corpus = (base / "corpus.jsonl").read_bytes() if data is None else data
    (root / "input/data/training/data.jsonl").write_bytes(corpus)
    hyper = sagemaker.created[training_job_name(job["job_id"])]["HyperParameters"]
    (root / "input/config/hyperparameters.json").write_text(json.dumps(hyper))
    return root


def _failure_event_reason(root: Path) -> str:
    return (root / "output/failure").read_text()


def _upload_outputs(aws, job: dict, root: Path) -> None:
    """What SageMaker does at the end (CompressionType NONE): model/ uploaded file by file under the
    job's model prefix."""
    bucket, prefix = artifact(aws, job["job_id"]).removeprefix("s3://").split("/", 1)
    s3 = aws.session.client("s3")
    for path in sorted((root / "model").rglob("*")):
        if path.is_file():
            s3.put_object(Bucket=bucket, Key=prefix + path.relative_to(root / "model").as_posix(), Body=path.read_bytes())


def _wait_for_step(root: Path, process: subprocess.Popen, step: int) -> dict:
    deadline = time.monotonic() + 90
    progress = root / "checkpoints/progress.json"
    while time.monotonic() < deadline and process.poll() is None:
        if progress.is_file():
            seen = json.loads(progress.read_text())
            if seen["step"] >= step:
                return seen
        time.sleep(0.02)
    raise AssertionError(f"the run never reached step {step} (exit {process.poll()})")


@pytest.mark.slow
def test_a_trainer_killed_mid_cycle_resumes_from_its_checkpoint_and_the_job_completes(
        faults, tenants, api, sagemaker, base_model_dir, tmp_path):
    job = stored(tenants, _create(api, cycles=2, steps_per_cycle=8, seq_len=32, lr=0.003)["job_id"])
    launch(job["job_id"])
    root = _ml_root(tmp_path, base_model_dir, job, sagemaker)
    env = {**os.environ, "FUSION_ML_ROOT": str(root), "FUSION_CHECKPOINT_EVERY": "2", "OMP_NUM_THREADS": "1"}
    train_command = [str(Path(sys.executable).with_name("train"))]
    killed = subprocess.Popen(train_command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen = _wait_for_step(root, killed, 5)
    killed.kill()  # SIGKILL mid-cycle: no chance to checkpoint on the way out
    killed.wait()
    faults.append("trainer SIGKILL mid-cycle")
    assert seen["cycle"] <= 1 and seen["tokens_trained"] == seen["step"] * 32
    checkpoint = torch.load(root / "checkpoints/checkpoint.pt", weights_only=False)
    assert 4 <= checkpoint["state"]["step"] < 16
    deliver(tenants, job["job_id"], "InProgress")
    assert api("GET", f"/jobs/{job['job_id']}")[1]["status"] == "running"

    restarted = subprocess.run(train_command, env=env, capture_output=True, text=True, timeout=120)
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    metrics = json.loads((root / "output/data/metrics.json").read_text())
    assert metrics["training_tokens"] == job["estimate"]["training_tokens"] == 2 * 8 * 32
    _upload_outputs(tenants, job, root)
    deliver(tenants, job["job_id"], "Completed")
    ended = stored(tenants, job["job_id"])
    assert ended["status"] == "completed" and ended["bill"] == job["estimate"]["total"]
    model = Catalog(session=tenants.session).get(ended["output_model_id"], "alice")
    assert model["depth"] == metrics["depth_after"] and model["perplexity"] == metrics["final_perplexity"]


@pytest.mark.slow
@pytest.mark.parametrize("fault, data, expected", [
    ("empty dataset", b"", "no text found"),
    ("corrupt dataset", b"\x00\x01\x02 {{{ not json\n" * 3, "line 1 is not JSON"),
    ("NaN loss", None, "training diverged"),
])
def test_a_trainer_failure_ends_the_job_failed_with_the_trainers_reason(
        faults, tenants, api, sagemaker, base_model_dir, tmp_path, monkeypatch, fault, data, expected):
    from training_image import entry
    from training_image.model import Decoder

    job = stored(tenants, _create(api, cycles=1, steps_per_cycle=3, seq_len=32)["job_id"])
    launch(job["job_id"])
    root = _ml_root(tmp_path, base_model_dir, job, sagemaker, data)
    if fault == "NaN loss":
        forward = Decoder.forward

        def diverging(self, idx, targets=None, reduction="mean"):
            out = forward(self, idx, targets, reduction)
            return out * float("nan") if targets is not None else out

        monkeypatch.setattr(Decoder, "forward", diverging)
    monkeypatch.setenv("FUSION_ML_ROOT", str(root))
    faults.append(fault)
    assert entry.main() != 0
    reason = _failure_event_reason(root)
    assert reason and expected.lower() in reason.lower()
    deliver(tenants, job["job_id"], "Failed", reason=reason)
    ended = stored(tenants, job["job_id"])
    assert (ended["status"], ended["bill"], ended["failure_reason"]) == ("failed", "0.00", reason)
