"""The HTTP API through its Lambda handler, on moto tables built from template.yaml."""

import json
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st

from functions.api import context
from shared.outputs import progress_key
from shared.pricing import estimate_contract, estimate_train
from shared.settings import ContractSettings, TrainSettings
from shared.shapes import SIZES, ModelConfig, grown_config
from shared.store import Catalog, Jobs
from tests.conftest import LambdaContext

from tests.conftest import progress_document

DATASET = "ds-aaaaaaaaaaaa"


@pytest.fixture
def world(aws, api):
    """alice owns a ready dataset, a pending one and a trained model; bob owns a trained model."""
    ddb = aws.session.client("dynamodb")
    bucket = aws.env["DATA_BUCKET"]
    for dataset_id, owner, status in [(DATASET, "alice", "ready"), ("ds-pppppppppppp", "alice", "pending"),
                                      ("ds-bbbbbbbbbbbb", "bob", "ready")]:
        ddb.put_item(TableName=aws.env["DATASETS_TABLE"], Item={
            "dataset_id": {"S": dataset_id}, "owner": {"S": owner}, "status": {"S": status},
            "s3_uri": {"S": f"s3://{bucket}/{owner}/datasets/{dataset_id}/data.jsonl"},
            "created_at": {"S": "2026-01-01T00:00:00Z"}, "name": {"S": "d"}})
    catalog = Catalog(session=aws.session)
    config = grown_config(SIZES["debug"])
    for model_id, owner in [("m-alice", "alice"), ("m-bob", "bob")]:
        catalog.register({
            "model_id": model_id, "owner": owner, "name": model_id, "kind": "trained", "parent_id": "base-debug",
            "job_id": "j0", "parameters": config.parameters(), "depth": config.n_layers, "perplexity": 20.0,
            "artifact_uri": f"s3://{aws.env['ARTIFACTS_BUCKET']}/jobs/j0/output/fusion-j0/output/model.tar.gz",
            "cost": "0.62", "config": config.model_dump(mode="json"), "dataset": DATASET, "created_at": "t"})
    return aws


def _train(**hyper):
    return {"type": "train", "model": "base-debug", "dataset": DATASET, "hyperparams": hyper}


def _queued(aws):
    sqs = aws.session.client("sqs")
    messages = sqs.receive_message(QueueUrl=aws.env["LAUNCH_QUEUE_URL"], MaxNumberOfMessages=10)
    return [json.loads(m["Body"]) for m in messages.get("Messages", [])]


def _stored(aws, owner="alice"):
    return Jobs(session=aws.session).list(owner)


def test_create_train_job(world, api):
    status, job = api("POST", "/jobs", _train(turns=2, steps_per_cycle=100))
    assert status == 201
    assert job["status"] == "queued" and job["owner"] == "alice" and job["type"] == "train"
    assert job["settings"]["output_name"] == f"model-{job['job_id']}"
    assert job["settings"]["turns"] == 2 and job["settings"]["cycles"] == 6
    expected = estimate_train(TrainSettings(turns=2, steps_per_cycle=100), SIZES["debug"])
    assert Decimal(job["estimate"]["total"]) == expected.total
    assert isinstance(job["estimate"]["total"], str)
    assert "under-trains" in job["warnings"][0]
    assert _queued(world) == [{"job_id": job["job_id"]}]
    stored = Jobs(session=world.session).get(job["job_id"])
    assert stored["dataset_uri"] == f"s3://{world.env['DATA_BUCKET']}/alice/datasets/{DATASET}/data.jsonl"
    assert stored["input_model_uri"].endswith("/base-models/debug/model.tar.gz")
    assert api("GET", f"/jobs/{job['job_id']}")[1] == job


def test_an_s3_uri_no_check_admitted_is_refused_even_under_the_tenant(world, api):
    uri = f"s3://{world.env['DATA_BUCKET']}/alice/corpus/"
    status, body = api("POST", "/jobs", {**_train(), "dataset": uri})
    assert status == 422 and body["error"]["details"][0]["field"] == "dataset"
    assert "neither checked nor pinned" in body["error"]["details"][0]["message"]


def test_create_contract_job(world, api):
    body = {"type": "contract", "hyperparams": {"source_model_id": "m-alice", "num_layers_to_contract": 5,
                                                "train_steps": 10}}
    status, job = api("POST", "/jobs", body)
    assert status == 201
    assert job["model"] == "m-alice" and job["dataset"] == DATASET  # calibration on the source's data
    expected = estimate_contract(ContractSettings(source_model_id="m-alice", train_steps=10),
                                 grown_config(SIZES["debug"]))
    assert Decimal(job["estimate"]["total"]) == expected.total
    assert Jobs(session=world.session).get(job["job_id"])["input_model_uri"].endswith("fusion-j0/output/model.tar.gz")
    # m-alice is base-debug grown and still holds the block growth inserted: the estimate says what that means
    [warning] = job["warnings"]
    assert "1 of the 5 blocks of m-alice were inserted by growth (3_1)" in warning and "near-identity" in warning


@pytest.mark.parametrize("path, query", [("/jobs", "dry_run=true"), ("/jobs/estimate", "")])
def test_estimate_writes_nothing(world, api, path, query):
    status, body = api("POST", path, _train(), query=query)
    assert status == 200
    assert Decimal(body["estimate"]["total"]) == estimate_train(TrainSettings(), SIZES["debug"]).total
    assert body["settings"]["lr"] == 1e-4
    assert _stored(world) == [] and _queued(world) == []


BAD_REQUESTS = [
    ("malformed JSON", None, '{"type": "train",', 422, "body"),
    ("not an object", [1, 2], None, 422, "body"),
    ("unknown type", {"type": "grow"}, None, 422, "type"),
    ("missing model", {"type": "train", "dataset": DATASET}, None, 422, "model"),
    ("wrong type", _train(lr="fast"), None, 422, "hyperparams.lr"),
    ("turns out of range", _train(turns=11), None, 422, "hyperparams.turns"),
    ("zero lr", _train(lr=0), None, 422, "hyperparams.lr"),
    ("unknown setting", _train(learning_rate=1), None, 422, "hyperparams.learning_rate"),
    ("unknown top-level key", {**_train(), "priority": 1}, None, 422, "priority"),
    ("bad output name", _train(output_name="a b"), None, 422, "hyperparams.output_name"),
    ("seq_len over context", _train(seq_len=1024), None, 422, "hyperparams.seq_len"),
    ("unknown model", {**_train(), "model": "base-huge"}, None, 404, "model"),
    ("another tenant's dataset id", {**_train(), "dataset": "ds-bbbbbbbbbbbb"}, None, 404, "dataset"),
    ("unknown dataset id", {**_train(), "dataset": "ds-zzzzzzzzzzzz"}, None, 404, "dataset"),
    ("dataset not ready", {**_train(), "dataset": "ds-pppppppppppp"}, None, 422, "dataset"),
    ("s3 outside the data bucket", {**_train(), "dataset": "s3://elsewhere/alice/x"}, None, 422, "dataset"),
    ("s3 under another tenant", {**_train(), "dataset": "s3://{data}/bob/x"}, None, 422, "dataset"),
    ("s3 escaping the prefix", {**_train(), "dataset": "s3://{data}/alice/../bob/x"}, None, 422, "dataset"),
    ("contract without source", {"type": "contract", "hyperparams": {}}, None, 422, "hyperparams.source_model_id"),
    ("contract ratio out of range", {"type": "contract", "hyperparams": {"source_model_id": "m-alice",
                                     "contraction_ratio": 0.95}}, None, 422, "hyperparams.contraction_ratio"),
    ("contract another tenant's model", {"type": "contract", "hyperparams": {"source_model_id": "m-bob"}},
     None, 404, "hyperparams.source_model_id"),
    ("contract a base model", {"type": "contract", "hyperparams": {"source_model_id": "base-tiny"}},
     None, 422, "hyperparams.source_model_id"),
    ("contract deeper than the source", {"type": "contract", "hyperparams": {"source_model_id": "m-alice",
                                         "num_layers_to_contract": 6}}, None, 422,
     "hyperparams.num_layers_to_contract"),
]


@pytest.mark.parametrize("name, body, raw, status, field", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_name_the_field_and_write_nothing(world, api, name, body, raw, status, field):
    if isinstance(body, dict) and "{data}" in body.get("dataset", ""):
        body = {**body, "dataset": body["dataset"].format(data=world.env["DATA_BUCKET"])}
    got, error = api("POST", "/jobs", body, raw=raw)
    assert got == status
    assert set(error["error"]) == {"code", "message", "details"}
    fields = [d["field"] for d in error["error"]["details"]]
    assert field in fields
    assert all(d["message"] for d in error["error"]["details"])
    assert _stored(world) == [] and _queued(world) == []


def test_dry_run_must_be_a_boolean(world, api):
    status, error = api("POST", "/jobs", _train(), query="dry_run=perhaps")
    assert status == 422 and error["error"]["details"][0]["field"] == "dry_run"


def test_enqueue_failure_marks_the_job_failed(world, api, monkeypatch):
    class BrokenQueue:
        def send_message(self, **kwargs):
            raise ConnectionError("queue unreachable")

    monkeypatch.setattr(context, "client", lambda service: BrokenQueue())
    status, error = api("POST", "/jobs", _train())
    assert status == 503 and error["error"]["code"] == "launch_queue_unavailable"
    [job] = _stored(world)
    assert job["status"] == "failed" and "queue unreachable" in job["failure_reason"]
    assert job["bill"] == "0.00"


def test_jobs_are_private_to_their_tenant(world, api):
    _, job = api("POST", "/jobs", _train())
    assert api("GET", f"/jobs/{job['job_id']}", tenant="bob")[0] == 404
    assert api("GET", "/jobs", tenant="bob") == (200, {"jobs": []})
    assert [j["job_id"] for j in api("GET", "/jobs")[1]["jobs"]] == [job["job_id"]]


@pytest.mark.parametrize("job_id", ["nope", "UPPER", "x" * 41])
def test_unknown_job_is_404(world, api, job_id):
    status, error = api("GET", f"/jobs/{job_id}")
    assert status == 404 and error["error"]["details"][0]["field"] == "job_id"


def test_progress_of_a_running_job(world, api):
    _, job = api("POST", "/jobs", _train())
    Jobs(session=world.session).transition(job["job_id"], "running")
    assert api("GET", f"/jobs/{job['job_id']}")[1]["progress"] is None  # nothing written yet
    progress = progress_document(job["job_id"], 10240, step=40)
    world.session.client("s3").put_object(Bucket=world.env["ARTIFACTS_BUCKET"],
                                          Key=progress_key(job['job_id']), Body=progress)
    assert api("GET", f"/jobs/{job['job_id']}")[1]["progress"] == json.loads(progress)


def test_unreadable_progress_never_fails_the_request(world, api):
    _, job = api("POST", "/jobs", _train())
    Jobs(session=world.session).transition(job["job_id"], "running")
    world.session.client("s3").put_object(Bucket=world.env["ARTIFACTS_BUCKET"],
                                          Key=progress_key(job['job_id']), Body=b"{half")
    status, body = api("GET", f"/jobs/{job['job_id']}")
    assert status == 200 and body["progress"] is None


def test_models(world, api):
    status, body = api("GET", "/models")
    ids = {m["model_id"] for m in body["models"]}
    assert status == 200 and ids == {f"base-{s}" for s in SIZES} | {"m-alice"}
    status, model = api("GET", "/models/m-alice")
    assert status == 200 and model["depth"] == 5 and model["parent_id"] == "base-debug" and model["cost"] == "0.62"
    assert api("GET", "/models/m-alice", tenant="bob")[0] == 404
    status, base = api("GET", "/models/base-small")
    assert base["kind"] == "base" and base["parameters"] == SIZES["small"].parameters()


def test_openapi_and_docs(world, api):
    status, spec = api("GET", "/openapi.json")
    assert status == 200
    assert {"/jobs", "/jobs/estimate", "/jobs/{job_id}", "/models", "/models/{model_id}"} <= set(spec["paths"])
    schemas = json.dumps(spec["components"]["schemas"])
    assert "steps_per_cycle" in schemas and "contraction_ratio" in schemas
    status, html = api("GET", "/docs")
    assert status == 200 and "swagger" in html.lower()


def test_a_request_without_identity_is_refused(world):
    from functions.api.app import lambda_handler
    from local.server import api_event

    event = api_event("GET", "/jobs")
    event["requestContext"]["authorizer"] = {"jwt": {"claims": {}, "scopes": None}}
    result = lambda_handler(event, LambdaContext())
    assert result["statusCode"] == 401


def test_unknown_route_is_a_json_404(world, api):
    status, error = api("GET", "/nowhere")
    assert status == 404 and error["error"]["code"] == "not_found"


def test_a_non_json_body_is_415_in_the_error_shape(world):
    from functions.api.app import lambda_handler
    from local.server import api_event

    event = api_event("POST", "/jobs", headers={"content-type": "text/plain"}, body="train", claims={"sub": "alice"})
    result = lambda_handler(event, LambdaContext())
    error = json.loads(result["body"])["error"]
    assert result["statusCode"] == 415 and error["details"][0]["field"] == "content-type"
    assert _stored(world) == []


def test_a_fault_of_ours_is_a_500_without_internals(world, api, monkeypatch):
    class Broken:
        def list(self, owner):
            raise RuntimeError("table /secret/path exploded")

    monkeypatch.setattr(context, "catalog", lambda: Broken())
    status, error = api("GET", "/models")
    assert status == 500 and error["error"]["code"] == "internal_error"
    assert "secret" not in json.dumps(error)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
_near_valid = st.fixed_dictionaries(
    {"type": st.sampled_from(["train", "contract", "grow", 1])},
    optional={"model": st.sampled_from(["base-debug", "base-tiny", "m-alice", "", "x" * 200]) | _json_values,
              "dataset": st.sampled_from([DATASET, "s3://x/y", ""]) | _json_values,
              "hyperparams": st.dictionaries(
                  st.sampled_from(["turns", "cycles", "steps_per_cycle", "lr", "seq_len", "train_steps",
                                   "output_name", "source_model_id", "contraction_ratio",
                                   "num_layers_to_contract", "bogus"]),
                  _json_values | st.integers(-10, 10_000), max_size=5)},
)


@hypothesis_settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_json_values | _near_valid)
def test_no_body_makes_the_api_fail_with_a_5xx(world, api, body):
    status, answer = api("POST", "/jobs", body, query="dry_run=true")
    assert status < 500, answer
    if status >= 400:
        assert answer["error"]["details"] or answer["error"]["code"].endswith("not_found")


def test_a_job_no_instance_can_hold_is_refused_with_the_figures(world, api):
    # A Llama 3.1 405B shape grows past 500B parameters: 16 bytes a parameter over 64 H100s is
    # more than one can hold, before any activation.
    huge = ModelConfig.uniform(vocab_size=128256, dim=16384, n_layers=126, n_heads=128, n_kv_heads=8,
                               mlp_hidden=53248, context_length=8192)
    Catalog(session=world.session).register({
        "model_id": "m-huge", "owner": "alice", "name": "m-huge", "kind": "trained", "parent_id": "base-debug",
        "job_id": "j0", "parameters": huge.parameters(), "depth": huge.n_layers, "perplexity": 20.0,
        "artifact_uri": f"s3://{world.env['ARTIFACTS_BUCKET']}/jobs/j0/output/fusion-j0/output/model.tar.gz",
        "cost": "0.62", "config": huge.model_dump(mode="json"), "dataset": DATASET, "created_at": "t"})
    status, error = api("POST", "/jobs", {**_train(), "model": "m-huge"})
    assert status == 422 and error["error"]["code"] == "does_not_fit"
    assert error["error"]["details"][0]["field"] == "model"
    assert "GiB per GPU" in error["error"]["message"] and "ml.p5.48xlarge" in error["error"]["message"]
    assert _stored(world) == [] and _queued(world) == []


def _flat_model(world, model_id: str, job_id: str, files: dict[str, bytes]) -> str:
    """alice's model as a job made it: its files uploaded uncompressed under the job's model prefix."""
    prefix = f"jobs/{job_id}/output/fusion-{job_id}/output/model/"
    bucket = world.env["ARTIFACTS_BUCKET"]
    for name, body in files.items():
        world.session.client("s3").put_object(Bucket=bucket, Key=prefix + name, Body=body)
    config = grown_config(SIZES["debug"])
    Catalog(session=world.session).register({
        "model_id": model_id, "owner": "alice", "name": model_id, "kind": "trained", "parent_id": "base-debug",
        "job_id": job_id, "parameters": config.parameters(), "depth": config.n_layers, "perplexity": 20.0,
        "artifact_uri": f"s3://{bucket}/{prefix}", "cost": "0.62", "config": config.model_dump(mode="json"),
        "dataset": DATASET, "created_at": "t"})
    return prefix


def test_download_of_a_model_a_job_made_is_each_file_with_its_path_and_a_usable_url(world, api):
    import requests

    files = {"config.json": b'{"dim": 64}', "metrics.json": b"{}", "hf/config.json": b'{"model_type": "llama"}',
             "hf/model.safetensors": b"\x00weights"}
    _flat_model(world, "m-flat", "j5", files)
    _flat_model(world, "m-empty", "j6", {})
    status, body = api("GET", "/models/m-flat/download")
    assert status == 200 and body["url"] is None and body["export_dir"] == "hf" and body["expires_in"] > 0
    assert sorted(f["path"] for f in body["files"]) == sorted(files)
    for entry in body["files"]:
        assert entry["size"] == len(files[entry["path"]]) and "X-Amz-Signature" in entry["url"]
        assert requests.get(entry["url"], timeout=10).content == files[entry["path"]]
    assert api("GET", "/models/m-flat/download", tenant="bob")[0] == 404
    status, error = api("GET", "/models/m-empty/download")
    assert status == 422 and "has no files" in error["error"]["message"]


def test_delete_a_model_a_job_made_removes_its_files_only(world, api):
    s3 = world.session.client("s3")
    bucket = world.env["ARTIFACTS_BUCKET"]
    mine = _flat_model(world, "m-flat", "j5", {"config.json": b"{}", "hf/model.safetensors": b"w"})
    other = _flat_model(world, "m-other", "j7", {"config.json": b"{}"})
    status, gone = api("DELETE", "/models/m-flat")
    assert status == 200 and gone["status"] == "deleted"
    left = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="jobs/").get("Contents", [])}
    assert not any(k.startswith(mine) for k in left) and other + "config.json" in left


def test_download_of_an_archived_model_is_one_presigned_url_of_the_callers_archive_only(world, api):
    from urllib.parse import urlparse

    status, body = api("GET", "/models/m-alice/download")
    assert status == 200 and body["export_dir"] == "hf" and body["expires_in"] > 0 and body["files"] == []
    url = urlparse(body["url"])
    assert url.path.endswith("/jobs/j0/output/fusion-j0/output/model.tar.gz") and "X-Amz-Signature" in url.query
    assert api("GET", "/models/m-bob/download")[0] == 404
    assert api("GET", "/models/base-debug/download")[1]["url"].split("?")[0].endswith("/base-models/debug/model.tar.gz")


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    from training_image.data import stdlib_corpus

    return stdlib_corpus(100_000)


def _upload_folder(aws, folder, prefix: str) -> str:
    s3 = aws.session.client("s3")
    for path in folder.iterdir():
        s3.upload_file(str(path), aws.env["DATA_BUCKET"], f"{prefix}{path.name}")
    return f"s3://{aws.env['DATA_BUCKET']}/{prefix}"


def test_register_a_hugging_face_folder_then_train_it(world, api, tmp_path, corpus):
    from tests.training_image.test_hf_import import hf_checkpoint

    hf = hf_checkpoint(tmp_path / "qwen", "qwen2", corpus)
    uri = _upload_folder(world, tmp_path / "qwen", "alice/models/qwen/")
    status, model = api("POST", "/models", {"name": "my-qwen", "uri": uri})
    assert status == 201 and model["status"] == "ready", model
    assert (model["family"], model["parameters"], model["depth"], model["context_length"]) == (
        "qwen2", hf.num_parameters(), 3, 128)
    assert model["model_id"] in {m["model_id"] for m in api("GET", "/models")[1]["models"]}
    assert model["model_id"] not in {m["model_id"] for m in api("GET", "/models", tenant="bob")[1]["models"]}
    status, job = api("POST", "/jobs", {"type": "train", "model": model["model_id"], "dataset": DATASET,
                                        "hyperparams": {"seq_len": 64}})
    assert status == 201, job
    assert Jobs(session=world.session).get(job["job_id"])["input_model_uri"] == uri


@pytest.mark.parametrize("damage, reason", [
    (lambda folder: _edit_config(folder, model_type="mixtral", num_local_experts=8), "mixture-of-experts"),
    (lambda folder: _edit_config(folder, hidden_act="gelu"), "activation 'gelu'"),
    (lambda folder: _edit_config(folder, intermediate_size=100), "has shape [96, 64], expected [100, 64]"),
    (lambda folder: next(folder.glob("model-00002-*.safetensors")).unlink(), "is not in the folder"),
    (lambda folder: (folder / "tokenizer.json").unlink(), "no tokenizer.json"),
    (lambda folder: _edit_config(folder, num_hidden_layers=4), "missing tensors"),
    (lambda folder: _edit_config(folder, num_hidden_layers=10**9), "outside 1..1024"),
])
def test_a_folder_that_cannot_be_trained_is_registered_rejected_with_the_reason(world, api, tmp_path, corpus, damage,
                                                                               reason):
    from tests.training_image.test_hf_import import hf_checkpoint

    hf_checkpoint(tmp_path / "qwen", "qwen2", corpus)
    damage(tmp_path / "qwen")
    uri = _upload_folder(world, tmp_path / "qwen", "alice/models/bad/")
    status, model = api("POST", "/models", {"name": "bad", "uri": uri})
    assert status == 201 and model["status"] == "rejected" and reason in model["reason"], model
    status, body = api("POST", "/jobs", {"type": "train", "model": model["model_id"], "dataset": DATASET})
    assert status == 422 and "rejected" in body["error"]["message"]


def test_register_refuses_a_folder_outside_the_callers_prefix(world, api):
    uri = f"s3://{world.env['DATA_BUCKET']}/bob/models/x/"
    status, body = api("POST", "/models", {"name": "x", "uri": uri})
    assert status == 422 and body["error"]["details"][0]["field"] == "uri"


def _edit_config(folder, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_the_operator_publishes_a_folder_every_tenant_lists_and_trains(world, api, tmp_path, corpus, capsys):
    from local.publish import main as publish
    from tests.training_image.test_hf_import import hf_checkpoint

    hf_checkpoint(tmp_path / "llama", "llama3", corpus)
    bucket = world.env["ARTIFACTS_BUCKET"]
    s3 = world.session.client("s3")
    for path in (tmp_path / "llama").iterdir():
        s3.upload_file(str(path), bucket, f"base-models/tiny-llama3/{path.name}")
    assert publish([f"s3://{bucket}/base-models/tiny-llama3/", "--name", "tiny-llama3"]) == 0
    assert "published hf-tiny-llama3: llama" in capsys.readouterr().out
    for tenant in ("alice", "bob"):
        listed = {m["model_id"]: m for m in api("GET", "/models", tenant=tenant)[1]["models"]}
        assert listed["hf-tiny-llama3"]["kind"] == "base" and listed["hf-tiny-llama3"]["status"] == "ready"
    status, job = api("POST", "/jobs", {"type": "train", "model": "hf-tiny-llama3", "dataset": DATASET,
                                        "hyperparams": {"seq_len": 64}})
    assert status == 201, job
    assert publish([f"s3://{bucket}/base-models/tiny-llama3/", "--name", "tiny-llama3"]) == 1  # once only

    (tmp_path / "llama/tokenizer.json").unlink()
    s3.delete_object(Bucket=bucket, Key="base-models/tiny-llama3/tokenizer.json")
    assert publish([f"s3://{bucket}/base-models/tiny-llama3/", "--name", "other"]) == 1
    assert "rejected: no tokenizer.json" in capsys.readouterr().err
    assert "hf-other" not in {m["model_id"] for m in api("GET", "/models")[1]["models"]}


def test_delete_a_model_keeps_its_lineage_and_removes_its_archive(world, api):
    s3 = world.session.client("s3")
    bucket, key = world.env["ARTIFACTS_BUCKET"], "jobs/j0/output/fusion-j0/output/model.tar.gz"
    s3.put_object(Bucket=bucket, Key=key, Body=b"archive")
    # What `fusion models deploy` unpacked beside it (shared.hf names the folder and its manifest),
    # and another job's folder, which stays.
    export = "jobs/j0/output/fusion-j0/output/hf/"
    unpacked = [export + "config.json", export + "model.safetensors", export + "sub/tokenizer.json",
                "jobs/j0/output/fusion-j0/output/hf.manifest.json"]
    for name in unpacked + ["jobs/j9/output/fusion-j9/output/hf/config.json"]:
        s3.put_object(Bucket=bucket, Key=name, Body=b"{}")
    Catalog(session=world.session).register({
        "model_id": "m-child", "owner": "alice", "name": "child", "kind": "contracted", "parent_id": "m-alice",
        "job_id": "j1", "parameters": 1, "depth": 1, "created_at": "t2"})
    assert api("DELETE", "/models/m-alice", tenant="bob")[0] == 404  # not bob's
    assert api("DELETE", "/models/base-debug")[0] == 422  # public
    status, gone = api("DELETE", "/models/m-alice")
    assert status == 200 and gone["status"] == "deleted" and gone["artifact_uri"] is None and gone["deleted_at"]
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix=key)
    left = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="jobs/").get("Contents", [])}
    assert left == {"jobs/j9/output/fusion-j9/output/hf/config.json"}, left
    assert api("DELETE", "/models/m-alice") == (200, gone)  # again: nothing changes
    listed = {m["model_id"] for m in api("GET", "/models")[1]["models"]}
    assert "m-alice" not in listed and "m-child" in listed
    child = api("GET", "/models/m-child")[1]
    assert child["parent_id"] == "m-alice" and api("GET", f"/models/{child['parent_id']}")[1]["status"] == "deleted"
    assert api("GET", "/models/m-alice/download")[0] == 404
    status, refused = api("POST", "/jobs/estimate", {"type": "contract", "hyperparams": {
        "source_model_id": "m-alice", "num_layers_to_contract": 1}})
    assert status == 422 and refused["error"]["details"][0]["message"] == "m-alice is deleted"


def test_a_model_a_live_job_reads_cannot_be_deleted(world, api):
    status, job = api("POST", "/jobs", {"type": "contract", "hyperparams": {
        "source_model_id": "m-alice", "num_layers_to_contract": 1}})
    assert status == 201
    status, refused = api("DELETE", "/models/m-alice")
    assert status == 409 and job["job_id"] in refused["error"]["message"]
    assert api("POST", f"/jobs/{job['job_id']}/cancel")[0] == 200
    assert api("DELETE", "/models/m-alice")[0] == 200


def test_delete_a_dataset_removes_its_data_and_keeps_its_record(world, api):
    s3 = world.session.client("s3")
    bucket, key = world.env["DATA_BUCKET"], f"alice/datasets/{DATASET}/data.jsonl"
    s3.put_object(Bucket=bucket, Key=key, Body=b'{"text": "x"}\n')
    assert api("DELETE", f"/datasets/{DATASET}", tenant="bob")[0] == 404
    status, gone = api("DELETE", f"/datasets/{DATASET}")
    assert status == 200 and gone["status"] == "deleted" and gone["deleted_at"]
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix=key)
    assert DATASET not in {d["dataset_id"] for d in api("GET", "/datasets")[1]["datasets"]}
    assert api("GET", f"/datasets/{DATASET}")[1]["status"] == "deleted"
    status, refused = api("POST", "/jobs", _train())
    assert status == 422 and "deleted" in refused["error"]["message"]


def _endpoint(aws, name: str, tags: list[dict]) -> None:
    """An endpoint in moto, as `fusion models deploy` leaves it (its tags are what IAM evaluates)."""
    sm = aws.session.client("sagemaker")
    sm.create_model(ModelName=name, ExecutionRoleArn="arn:aws:iam::123456789012:role/endpoint",
                    PrimaryContainer={"Image": "tgi"})
    sm.create_endpoint_config(EndpointConfigName=name, ProductionVariants=[{
        "VariantName": "AllTraffic", "ModelName": name, "InitialInstanceCount": 1, "InstanceType": "ml.g4dn.xlarge"}])
    sm.create_endpoint(EndpointName=name, EndpointConfigName=name, Tags=tags)


def _endpoint_answers(*bodies) -> None:
    """What the serving container answers next (moto answers whatever it is told to)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.sagemakerruntime.models import sagemakerruntime_backends

    queue = sagemakerruntime_backends[DEFAULT_ACCOUNT_ID]["us-east-1"].results_queue
    queue.extend((json.dumps(body), "application/json", "AllTraffic", "") for body in bodies)


def test_generate_answers_from_this_stacks_endpoint_of_the_model(world, api, roles):
    from local.resources import pseudo_parameters
    from shared import serving

    stack = pseudo_parameters("us-east-1")["AWS::StackName"]
    name = serving.endpoint_name("m-alice")
    # Not deployed: a 409 that says how to deploy it (under the role, AWS answers AccessDenied).
    status, refused = api("POST", "/models/m-alice/generate", {"prompt": "Hello"})
    assert status == 409 and refused["error"]["code"] == "not_deployed"
    assert "fusion models deploy m-alice" in refused["error"]["message"] and "--stack" in refused["error"]["message"]
    # Another stack's endpoint of the same name: the role may not invoke it.
    _endpoint(world, name, [{"Key": serving.STACK_TAG, "Value": "another-stack"}])
    assert api("POST", "/models/m-alice/generate", {"prompt": "Hello"})[0] == 409

    sm = world.session.client("sagemaker")
    arn = sm.describe_endpoint(EndpointName=name)["EndpointArn"]
    sm.add_tags(ResourceArn=arn, Tags=[{"Key": serving.STACK_TAG, "Value": stack}])
    _endpoint_answers([{"generated_text": " world"}],
                      {"choices": [{"message": {"role": "assistant", "content": " Hi there. "}}]})
    status, answer = api("POST", "/models/m-alice/generate", {"prompt": "Hello", "max_tokens": 8, "temperature": 0})
    assert status == 200, answer
    assert answer["text"] == " world" and answer["messages"] is None and answer["endpoint"] == name
    assert isinstance(answer["latency_ms"], int) and answer["latency_ms"] >= 0
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    status, answer = api("POST", "/models/m-alice/generate", {"messages": chat})
    assert status == 200 and answer["text"] == "Hi there."
    assert answer["messages"] == chat + [{"role": "assistant", "content": "Hi there."}]

    assert api("POST", "/models/m-bob/generate", {"prompt": "Hello"})[0] == 404  # not alice's
    for bad in ({}, {"prompt": "a", "messages": chat}, {"messages": chat[:1]}, {"prompt": "a", "max_tokens": 10_000},
                {"prompt": "a", "temperature": -1}):
        status, body = api("POST", "/models/m-alice/generate", bad)
        assert status == 422, (bad, body)
    # The refusals above were the role's, as AWS evaluates them: no endpoint, then another stack's.
    denied = roles.denied()
    assert [(c.operation, c.requests[0].context) for c in denied] == [
        ("sagemaker-runtime:InvokeEndpoint", ()),
        ("sagemaker-runtime:InvokeEndpoint", (("aws:ResourceTag/fusion:stack", "another-stack"),))]
    with roles.lock:
        roles.calls = [c for c in roles.calls if c not in denied]


def test_the_generation_body_is_what_tgi_takes_and_reads_back():
    from shared import serving

    chat = [{"role": "user", "content": "Hi"}]
    for prompt, messages, temperature in (("Hello", None, 0.0), ("Hello", None, 0.7), (None, chat, 0.7), (None, chat, 0.0)):
        body = serving.invocation(prompt=prompt, messages=messages, max_tokens=12, temperature=temperature)
        assert serving.read_invocation(body) == {"prompt": prompt, "messages": messages, "max_tokens": 12,
                                                 "temperature": temperature}
    greedy = serving.invocation(prompt="Hello", messages=None, max_tokens=3, temperature=0)
    assert greedy["parameters"]["do_sample"] is False and "temperature" not in greedy["parameters"]  # TGI refuses 0
    assert serving.answer_text(serving.prompt_answer("x")) == "x"
    assert serving.answer_text(serving.chat_answer("y", "m")) == "y"
    with pytest.raises(ValueError):
        serving.answer_text({"error": "overloaded"})


def test_a_contract_estimate_forecasts_the_size_after_contraction(world, api):
    from shared.shapes import forecast_contraction

    config = grown_config(SIZES["debug"])
    sizes = []
    for ratio in (0.25, 0.5, 0.75):
        status, quote = api("POST", "/jobs/estimate", {"type": "contract", "hyperparams": {
            "source_model_id": "m-alice", "num_layers_to_contract": 2, "contraction_ratio": ratio}})
        assert status == 200, quote
        forecast = quote["estimate"]["contraction"]
        assert forecast == forecast_contraction(config, ratio, 2).model_dump(mode="json")
        assert forecast["depth"] == config.n_layers and forecast["parameters_min"] == forecast["parameters_max"]
        sizes.append(forecast["parameters_min"])
    assert config.parameters() > sizes[0] > sizes[1] > sizes[2]  # the ratio moves the size
    status, quote = api("POST", "/jobs/estimate", _train())
    assert status == 200 and quote["estimate"]["contraction"] is None
