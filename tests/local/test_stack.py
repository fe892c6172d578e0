"""The embedded default end to end: the CLI against the local stack, through the real functions and trainer."""

from __future__ import annotations

import hashlib
import json
import time

import boto3
import pytest
import requests

from local.cli import main
from shared.outputs import progress_key

SMALL_TRAIN = ["--cycles", "2", "--train-steps", "20", "--seq-len", "64", "--output-name", "stdlib-debug"]


def fusion(stack, capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["--api-url", stack.api_url, *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def dataset_id(stack, dataset_file):
    response = requests.post(f"{stack.api_url}/datasets", json={"name": "stdlib", "format": "jsonl"}).json()
    requests.put(response["upload_url"], data=dataset_file.read_bytes()).raise_for_status()
    for _ in range(100):
        shown = requests.get(f"{stack.api_url}/datasets/{response['dataset_id']}").json()
        if shown["status"] != "pending":
            break
        time.sleep(0.1)
    assert shown["status"] == "ready", shown
    return shown["dataset_id"]


@pytest.mark.slow
def test_train_then_contract_fills_the_catalog(stack, capsys, dataset_id):
    code, out, _ = fusion(stack, capsys, "jobs", "create", "train", "--model", "base-debug", "--dataset", dataset_id,
                          *SMALL_TRAIN, "--wait")
    assert code == 0, out
    assert "completed: model m-" in out and "100%" in out
    train_job = requests.get(f"{stack.api_url}/jobs").json()["jobs"][0]
    trained = train_job["output_model_id"]
    source_before = _catalog_record_and_artifact(stack, trained)

    code, out, _ = fusion(stack, capsys, "jobs", "create", "contract", "--source-model-id", trained,
                          "--num-layers-to-contract", "2", "--contraction-ratio", "0.5", "--train-steps", "4", "--wait")
    assert code == 0, out
    contract_job = requests.get(f"{stack.api_url}/jobs").json()["jobs"][0]
    assert contract_job["type"] == "contract" and contract_job["status"] == "completed"
    assert _catalog_record_and_artifact(stack, trained) == source_before, "contraction changed its source"

    catalog = {m["model_id"]: m for m in requests.get(f"{stack.api_url}/models").json()["models"]}
    base, grown, contracted = catalog["base-debug"], catalog[trained], catalog[contract_job["output_model_id"]]
    assert (grown["kind"], grown["parent_id"], grown["name"]) == ("trained", "base-debug", "stdlib-debug")
    assert grown["depth"] == base["depth"] + 1 and grown["parameters"] > base["parameters"]
    assert contracted["kind"] == "contracted" and contracted["parent_id"] == trained
    assert contracted["depth"] == grown["depth"] and contracted["parameters"] < grown["parameters"]
    for model in (grown, contracted):
        assert model["perplexity"] > 1 and model["cost"] is not None
        assert model["perplexity_on"]["dataset"] == model["dataset"] and len(model["perplexity_on"]["sha256"]) == 64
        # uploaded uncompressed (CompressionType NONE): the model is the files under the job's prefix output/model/
        assert model["artifact_uri"].endswith("/output/model/")
        bucket, prefix = model["artifact_uri"].removeprefix("s3://").split("/", 1)
        output = [o["Key"] for o in boto3.client("s3").list_objects_v2(
            Bucket=bucket, Prefix=prefix.removesuffix("model/"))["Contents"]]
        assert f"{prefix}config.json" in output and f"{prefix}hf/config.json" in output
        assert f"{prefix}metrics.json" in output and not any(k.endswith(".tar.gz") for k in output)
    # the contract job's model channel was the trained model's prefix, its files copied as they are
    channel = stack.runs_dir / contract_job["training_job_name"] / "input/data/model"
    assert (channel / "config.json").is_file() and (channel / "hf/config.json").is_file()
    assert not list(channel.glob("*.tar.gz"))
    # the contract job measured the parent on its own windows: the pair compares, the parent's catalog figure may not
    assert contracted["parent_perplexity"] > 1 and contracted["perplexity_on"]["seq_len"] == 256
    assert train_job["bill"] == train_job["estimate"]["total"]

    code, out, _ = fusion(stack, capsys, "models", "list")
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert rows[trained][-1] == "base-debug" and rows[contract_job["output_model_id"]][-1] == trained
    assert out.splitlines()[0].split() == ["MODEL", "NAME", "KIND", "PARAMETERS", "DEPTH", "PERPLEXITY", "MEASURED", "ON",
                                           "COST", "PARENT"]

    code, out, _ = fusion(stack, capsys, "models", "show", trained)
    assert code == 0 and "parent" in out and "base-debug" in out and f"{grown['parameters']:,}" in out

    code, out, _ = fusion(stack, capsys, "jobs", "list")
    assert code == 0 and train_job["job_id"] in out and contract_job["job_id"] in out

    code, out, _ = fusion(stack, capsys, "jobs", "get", train_job["job_id"])
    assert code == 0 and "completed" in out and trained in out

    code, out, _ = fusion(stack, capsys, "jobs", "wait", contract_job["job_id"])
    assert code == 0 and f"completed: model {contract_job['output_model_id']}" in out


def _catalog_record_and_artifact(stack, model_id: str) -> tuple[dict, str]:
    """The model's raw catalog item and the digest of its files (each key and its bytes)."""
    item = boto3.client("dynamodb").get_item(TableName=stack.env["MODELS_TABLE"], Key={"model_id": {"S": model_id}})["Item"]
    artifact = requests.get(f"{stack.api_url}/models/{model_id}").json()["artifact_uri"]
    bucket, prefix = artifact.removeprefix("s3://").split("/", 1)
    s3, digest = boto3.client("s3"), hashlib.sha256()
    for listed in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]:
        digest.update(listed["Key"].encode() + s3.get_object(Bucket=bucket, Key=listed["Key"])["Body"].read())
    return item, digest.hexdigest()


@pytest.mark.slow
def test_trainer_failure_reaches_the_job_with_its_reason(stack, capsys):
    # So that the trainer itself meets bad data, a dataset is written straight into the table as
    # ready (no check ran, no object pinned), then its object lands: the check leaves a ready
    # dataset alone, and the job trains on bytes the check would have rejected.
    bucket, dataset = stack.env["DATA_BUCKET"], "ds-broken000000"
    boto3.client("dynamodb").put_item(TableName=stack.env["DATASETS_TABLE"], Item={
        "dataset_id": {"S": dataset}, "owner": {"S": "local"}, "status": {"S": "ready"}, "name": {"S": "broken"},
        "s3_uri": {"S": f"s3://{bucket}/local/datasets/{dataset}/data.jsonl"}, "created_at": {"S": "2026-01-01T00:00:00Z"}})
    boto3.client("s3").put_object(Bucket=bucket, Key=f"local/datasets/{dataset}/data.jsonl",
                                  Body=b'{"title": "no text"}\n' * 50)
    code, out, err = fusion(stack, capsys, "jobs", "create", "train", "--model", "base-debug",
                            "--dataset", dataset, *SMALL_TRAIN, "--wait")
    assert code == 1
    job = requests.get(f"{stack.api_url}/jobs").json()["jobs"][0]
    assert job["status"] == "failed" and job["failure_reason"].startswith("AlgorithmError: ")
    run_failure = (stack.runs_dir / job["training_job_name"] / "output/failure").read_text().strip()
    assert run_failure and run_failure in job["failure_reason"]
    assert err.startswith("error: job ") and run_failure[:40] in err and len(err.strip().splitlines()) == 1


def test_a_job_requested_on_the_bus_becomes_a_job(stack, dataset_id):
    request = {"type": "train", "model": "base-debug", "dataset": dataset_id,
               "hyperparams": {"train_steps": 2, "cycles": 1, "seq_len": 32, "output_name": "from-the-bus"}}
    answer = boto3.client("events").put_events(Entries=[{
        "Source": "pipelines.test", "DetailType": "Fusion Job Requested", "EventBusName": stack.env["EVENT_BUS_NAME"],
        "Detail": json.dumps({"owner": "local", "request": request})}])
    assert answer["FailedEntryCount"] == 0
    deadline = time.monotonic() + 20
    while not (jobs := [j for j in requests.get(f"{stack.api_url}/jobs").json()["jobs"]
                        if j["settings"].get("output_name") == "from-the-bus"]):
        assert time.monotonic() < deadline, "the requested job never appeared"
        time.sleep(0.2)
    assert jobs[0]["job_id"].startswith("r-") and jobs[0]["model"] == "base-debug"


def test_estimate_prices_without_creating(stack, capsys, dataset_id):
    code, out, _ = fusion(stack, capsys, "estimate", "train", "--model", "base-debug", "--dataset", dataset_id,
                          "--turns", "2", "--steps-per-cycle", "100", "--cycles", "3", "--seq-len", "64")
    assert code == 0
    assert "38,400" in out and "growth fee" in out and "total" in out  # 2 x 3 x 100 x 64 tokens
    assert "under-trains" in out
    code, out, _ = fusion(stack, capsys, "--json", "estimate", "train", "--model", "base-debug", "--dataset", dataset_id)
    assert json.loads(out)["estimate"]["training_tokens"] == 6 * 1000 * 256


def test_bad_settings_are_one_line_with_the_field(stack, capsys, dataset_id):
    code, out, err = fusion(stack, capsys, "estimate", "train", "--model", "base-debug", "--dataset", dataset_id,
                            "--seq-len", "4096")
    assert code == 1 and out == ""
    assert err.startswith("error: --seq-len: ") and "hyperparams" not in err and len(err.strip().splitlines()) == 1
    code, _, err = fusion(stack, capsys, "jobs", "create", "train", "--model", "base-nope", "--dataset", dataset_id)
    assert code == 1 and "base-nope" in err


def test_datasets_upload_ready_and_rejected(stack, capsys, dataset_file, tmp_path):
    code, out, _ = fusion(stack, capsys, "datasets", "upload", str(dataset_file))
    assert code == 0 and "ready" in out and "stdlib" in out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    code, out, err = fusion(stack, capsys, "datasets", "upload", str(bad))
    assert code == 1 and "rejected" in out and "error: " in err and "line 2 is not JSON" in err
    code, out, _ = fusion(stack, capsys, "datasets", "list")
    assert code == 0 and out.count("rejected") == 1


def test_jobs_and_models_errors(stack, capsys):
    code, _, err = fusion(stack, capsys, "jobs", "get", "no-such-job")
    assert code == 1 and "no-such-job" in err
    code, _, err = fusion(stack, capsys, "models", "show", "m-missing")
    assert code == 1 and "m-missing" in err


def test_unreachable_api_is_one_clear_line(capsys):
    code = main(["--api-url", "http://127.0.0.1:9", "models", "list"])
    err = capsys.readouterr().err
    assert code == 1 and err.strip() == ("error: cannot reach the Fusion API at http://127.0.0.1:9: start it with "
                                         "`fusion serve` or pass --api-url")


@pytest.mark.slow
def test_cancel_stops_the_trainer_and_bills_what_it_trained(stack, capsys, dataset_id):
    job = requests.post(f"{stack.api_url}/jobs", json={
        "type": "train", "model": "base-debug", "dataset": dataset_id,
        "hyperparams": {"cycles": 2, "train_steps": 5000, "seq_len": 64}}).json()
    deadline = time.monotonic() + 60
    while not ((shown := requests.get(f"{stack.api_url}/jobs/{job['job_id']}").json()).get("progress") or {}).get("step"):
        assert time.monotonic() < deadline, shown
        time.sleep(0.2)
    code, out, _ = fusion(stack, capsys, "jobs", "cancel", job["job_id"])
    assert code == 0 and out.strip() == f"job {job['job_id']} cancelling"
    assert stack.sagemaker.wait(shown["training_job_name"], 30) == "Stopped"
    assert stack.sagemaker.jobs[shown["training_job_name"]].process.poll() is not None
    code, out, _ = fusion(stack, capsys, "jobs", "wait", job["job_id"], "--timeout", "30")
    assert code == 1 and "cancelled: billed $" in out
    ended = requests.get(f"{stack.api_url}/jobs/{job['job_id']}").json()
    assert ended["status"] == "cancelled" and ended["bill"] is not None
    trained = json.loads(boto3.client("s3").get_object(
        Bucket=stack.env["ARTIFACTS_BUCKET"], Key=progress_key(job['job_id']))["Body"].read())
    assert 0 < trained["tokens_trained"] < ended["estimate"]["training_tokens"]
    code, _, err = fusion(stack, capsys, "jobs", "cancel", job["job_id"])
    assert code == 0 or "already" in err


@pytest.mark.slow
def test_serve_prints_one_line_per_job_event(stack, dataset_id):
    from local.cli import job_event_line

    seen: dict[str, str] = {}
    stack.changed_jobs(seen)  # the jobs of earlier tests
    job = requests.post(f"{stack.api_url}/jobs", json={
        "type": "train", "model": "base-debug", "dataset": dataset_id,
        "hyperparams": {"train_steps": 5000, "seq_len": 64}}).json()
    (changed,) = stack.changed_jobs(seen)
    again = stack.changed_jobs(seen)  # a status is said once; the launcher may have moved the job on since
    assert changed["job_id"] == job["job_id"] and all(j["status"] != changed["status"] for j in again)
    line = job_event_line(changed)
    assert f"job {job['job_id']} (train of base-debug, tenant local): {changed['status']}" in line
    requests.post(f"{stack.api_url}/jobs/{job['job_id']}/cancel").raise_for_status()
    deadline = time.monotonic() + 60
    lines = []
    while not any(": cancelled, billed $" in line for line in lines):
        assert time.monotonic() < deadline, lines
        lines += [job_event_line(j) for j in stack.changed_jobs(seen)]
        time.sleep(0.2)


def test_fusion_serve_runs_in_the_foreground_and_stops_on_ctrl_c(tmp_path):
    import signal
    import subprocess
    import sys

    server = subprocess.Popen([sys.executable, "-m", "local.cli", "serve", "--port", "0", "--sizes", "debug"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = None
        for line in server.stdout:
            if line.startswith("ready: API at "):
                url = line.split()[3]
                break
        assert url, "fusion serve never said it was ready"
        console_line = next(server.stdout).split()
        assert console_line[:1] == ["console:"] and console_line[1] == f"{url}/console"
        assert "<title>Fusion Training Console</title>" in requests.get(console_line[1]).text
        assert any(m["model_id"] == "base-debug" for m in requests.get(f"{url}/models").json()["models"])
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{url}/models", timeout=2)
    finally:
        if server.poll() is None:
            server.kill()


@pytest.mark.slow
def test_models_download_to_a_folder_transformers_loads_and_generate_samples(stack, capsys, dataset_id, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from local.models import fetch_model
    from training_image.generate import generate
    from training_image.modeldir import load_model_dir

    code, out, _ = fusion(stack, capsys, "jobs", "create", "train", "--model", "base-debug", "--dataset", dataset_id,
                          "--cycles", "1", "--train-steps", "4", "--seq-len", "64", "--wait")
    assert code == 0, out
    trained = requests.get(f"{stack.api_url}/jobs").json()["jobs"][0]["output_model_id"]
    code, out, _ = fusion(stack, capsys, "jobs", "create", "contract", "--source-model-id", trained,
                          "--num-layers-to-contract", "2", "--contraction-ratio", "0.5", "--train-steps", "0", "--wait")
    assert code == 0, out
    contracted = requests.get(f"{stack.api_url}/jobs").json()["jobs"][0]["output_model_id"]

    tokens = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    for model_id in ("base-debug", trained, contracted):  # the base has no export in its archive: written here
        code, out, err = fusion(stack, capsys, "models", "download", model_id, "--out", str(tmp_path / model_id))
        assert code == 0, err
        ours, _ = load_model_dir(fetch_model(_client(stack), model_id, tmp_path / f"{model_id}-archive"))
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / model_id).eval()
        with torch.no_grad():
            assert (hf(tokens).logits - ours(tokens)).abs().max() < 1e-4, model_id

    code, out, err = fusion(stack, capsys, "models", "generate", contracted, "--prompt", "def ", "--max-tokens", "6",
                            "--temperature", "0")
    assert code == 0, err
    ours, tokenizer = load_model_dir(tmp_path / f"{contracted}-archive/model")
    expected = generate(ours, tokenizer.prompt_ids("def "), 6, stop={tokenizer.eos_id})
    assert out.rstrip("\n") == "def " + tokenizer.decode([t for t in expected if t != tokenizer.eos_id])

    code, _, err = fusion(stack, capsys, "models", "download", "m-missing", "--out", str(tmp_path / "none"))
    first, *hints = err.strip().splitlines()  # the error's line, then the CLI's indented hints
    assert code == 1 and "m-missing" in first and all(hint.startswith("  ") for hint in hints)


def _client(stack):
    from local.cli import Client

    return Client(stack.api_url)


def test_the_api_generates_locally_as_the_cli_does(stack, capsys):
    """The local stack serves every ready model as if deployed: POST /models/{id}/generate answers
    with what `fusion models generate` samples from the same archive (greedy, so the same text)."""
    url = f"{stack.api_url}/models/base-debug/generate"
    answer = requests.post(url, json={"prompt": "def ", "max_tokens": 6, "temperature": 0}, timeout=60)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    code, out, err = fusion(stack, capsys, "models", "generate", "base-debug", "--prompt", "def ", "--max-tokens", "6",
                            "--temperature", "0")
    assert code == 0, err
    assert "def " + body["text"] == out.rstrip("\n")
    assert body["endpoint"] == "fusion-base-debug" and body["latency_ms"] >= 0 and body["messages"] is None

    chat = [{"role": "user", "content": "Hello"}]
    answer = requests.post(url, json={"messages": chat, "max_tokens": 4, "temperature": 0}, timeout=60).json()
    code, out, err = fusion(stack, capsys, "--json", "models", "generate", "base-debug", "--chat", "--prompt", "Hello",
                            "--max-tokens", "4", "--temperature", "0")
    assert code == 0, err
    assert answer["messages"] == json.loads(out)["messages"]  # the conversation, with the assistant's turn

    missing = requests.post(f"{stack.api_url}/models/m-missing/generate", json={"prompt": "x"}, timeout=30)
    assert missing.status_code == 404
