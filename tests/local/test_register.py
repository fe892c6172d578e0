"""`fusion models register DIR --name ...`: a Hugging Face folder on this machine uploaded through
presigned URLs to the caller's prefix and registered, through the local HTTP server."""

from __future__ import annotations

import json

import pytest

from local.cli import main
from local.register import folder_files


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    from training_image.data import stdlib_corpus

    return stdlib_corpus(100_000)


@pytest.fixture
def warm(api):
    """The handlers' roles read once (the SAM transform of the template), before the CLI's own timeouts run."""
    assert api("GET", "/models")[0] == 200


def _fusion(server, capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["--api-url", server, "--json", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_local_folder_is_uploaded_to_the_callers_prefix_and_registered(aws, warm, server, capsys, tmp_path, corpus):
    from tests.training_image.test_hf_import import hf_checkpoint

    hf = hf_checkpoint(tmp_path / "qwen", "qwen2", corpus)
    (tmp_path / "qwen" / "README.md").write_text("not uploaded")
    code, out, err = _fusion(server, capsys, "models", "register", str(tmp_path / "qwen"), "--name", "my-qwen")
    assert code == 0, err
    model = json.loads(out)
    assert model["status"] == "ready" and model["kind"] == "imported" and model["name"] == "my-qwen"
    assert (model["family"], model["parameters"]) == ("qwen2", hf.num_parameters())
    bucket = aws.env["DATA_BUCKET"]
    assert model["artifact_uri"].startswith(f"s3://{bucket}/") and "/models/up-" in model["artifact_uri"]
    prefix = model["artifact_uri"].removeprefix(f"s3://{bucket}/")
    keys = {o["Key"].removeprefix(prefix) for o in aws.session.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]}
    assert keys == {p.relative_to(tmp_path / "qwen").as_posix() for p in folder_files(tmp_path / "qwen")}
    assert "README.md" not in keys and "config.json" in keys and "model.safetensors.index.json" in keys
    listed = json.loads(_fusion(server, capsys, "models", "show", model["model_id"])[1])
    assert listed["model_id"] == model["model_id"] and listed["status"] == "ready"


def test_a_folder_that_is_no_model_is_refused_with_why(aws, warm, server, capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = _fusion(server, capsys, "models", "register", str(tmp_path / "empty"), "--name", "x")
    assert code == 1 and "has no config.json" in err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    code, out, err = _fusion(server, capsys, "models", "register", str(tmp_path / "bad"), "--name", "x")
    assert code == 1 and "was rejected" in err and json.loads(out)["status"] == "rejected"


def test_upload_urls_are_refused_for_names_that_leave_the_folder(aws, api):
    for name in ("../escape", "/abs", "a/../../b", ".hidden"):
        status, body = api("POST", "/models/uploads", {"files": [{"name": name, "bytes": 1}]})
        assert status == 422, (name, body)
    status, body = api("POST", "/models/uploads", {"files": [{"name": "a.json", "bytes": 1}, {"name": "a.json", "bytes": 2}]})
    assert status == 422 and body["error"]["details"][0]["field"] == "files"
    status, body = api("POST", "/models/uploads", {"files": [{"name": "a.json", "bytes": 6 * 1024**3}]})
    assert status == 422
    status, body = api("POST", "/models/uploads", {"files": [{"name": "config.json", "bytes": 10}]})
    assert status == 201 and body["uri"].startswith(f"s3://{aws.env['DATA_BUCKET']}/alice/models/up-")
