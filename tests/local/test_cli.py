"""The CLI against the real HTTP API (the local server into the API's handler, on moto): what it
sends, and how it shows the API's answers and refusals."""

from __future__ import annotations

import json
import re
from decimal import Decimal

import pytest
import requests

from local.cli import human, main
from shared.contracts import Progress
from shared.outputs import progress_key
from shared.settings import TrainSettings
from shared.shapes import SIZES, grown_config
from shared.store import Catalog, Jobs, now
from shared.training_jobs import training_job_name
from tests.conftest import deliver, unsigned_jwt, write_metrics

DATASET = "ds-aaaaaaaaaaaa"
TOKEN = unsigned_jwt({"sub": "alice"})


@pytest.fixture
def cli(aws, server, capsys, monkeypatch):
    """fusion(*args) -> (exit code, stdout, stderr) as alice, who owns a ready dataset; the
    requests the CLI sent are kept in fusion.sent as (method, path, JSON body, authorization)."""
    aws.session.client("dynamodb").put_item(TableName=aws.env["DATASETS_TABLE"], Item={
        "dataset_id": {"S": DATASET}, "owner": {"S": "alice"}, "status": {"S": "ready"}, "name": {"S": "notes"},
        "s3_uri": {"S": f"s3://{aws.env['DATA_BUCKET']}/alice/datasets/{DATASET}/data.jsonl"},
        "bytes": {"N": "2048000"}, "tokens": {"N": "310000"}, "created_at": {"S": "2026-01-01T00:00:00Z"}})
    sent: list[tuple[str, str, object, str | None]] = []
    send = requests.Session.request

    def recorded(session, method, url, **kwargs):
        sent.append((method, url.removeprefix(server), kwargs.get("json"), session.headers.get("Authorization")))
        return send(session, method, url, **kwargs)

    monkeypatch.setattr(requests.Session, "request", recorded)
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "true")  # as `fusion serve` runs: the CLI's output only

    def fusion(*args: str, token: str | None = TOKEN) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(["--api-url", server, *(["--token", token] if token else []), *args])
        out, err = capsys.readouterr()
        return code, out, err

    fusion.sent = sent
    return fusion


def _train(api, **hyper) -> dict:
    status, job = api("POST", "/jobs", {"type": "train", "model": "base-debug", "dataset": DATASET, "hyperparams": hyper})
    assert status == 201, job
    return job


def test_create_sends_only_the_given_settings(cli, aws):
    code, out, _ = cli("jobs", "create", "train", "--model", "base-debug", "--dataset", DATASET,
                       "--turns", "2", "--steps-per-cycle", "100", "--lr", "0.001")
    assert code == 0
    method, path, body, authorization = cli.sent[-1]
    assert (method, path, authorization) == ("POST", "/jobs", f"Bearer {TOKEN}")
    assert body == {"type": "train", "model": "base-debug", "dataset": DATASET,
                    "hyperparams": {"turns": 2, "steps_per_cycle": 100, "lr": 0.001}}
    (job,) = Jobs(session=aws.session).list("alice")
    estimate = job["estimate"]
    assert job["settings"]["cycles"] == TrainSettings().cycles  # the API's default, not the CLI's
    assert f"job {job['job_id']} queued: estimate ${estimate['total']}, eta " in out
    assert "under-trains" in out


def test_cancel_reports_the_api_answer(cli, api, aws):
    job = _train(api)
    code, out, _ = cli("jobs", "cancel", job["job_id"])
    assert code == 0 and out.strip() == f"job {job['job_id']} cancelled, billed $0.00"
    assert cli("jobs", "cancel", job["job_id"])[:2] == (0, out)  # repeating it is harmless

    done = _train(api)
    write_metrics(aws, done)
    deliver(aws, done["job_id"], "InProgress", "Completed")
    code, _, err = cli("jobs", "cancel", done["job_id"])
    assert code == 1
    assert err.strip() == (f"error: job '{done['job_id']}' has already completed: there is nothing to cancel "
                           "(job_id: the job is completed)")


def test_wait_follows_progress_until_the_end(cli, api, aws):
    job = _train(api)
    job_id = job["job_id"]
    Jobs(session=aws.session).transition(job_id, "running", training_job_name=training_job_name(job_id))
    progress = Progress(job_id=job_id, job_type="train", turn=1, turns=2, cycle=3, cycles=6, step=40, total_steps=120,
                        loss=3.25, perplexity=25.8, tokens_trained=40 * 256, tokens_per_second=100.0,
                        eta_seconds=95.0, updated_at=now())
    aws.session.client("s3").put_object(Bucket=aws.env["ARTIFACTS_BUCKET"], Key=progress_key(job_id),
                                        Body=progress.model_dump_json())
    code, out, err = cli("jobs", "wait", job_id, "--timeout", "1.5")
    assert code == 1 and f"job {job_id} is still running after 2s" in err
    assert "turn 1/2 · cycle 3/6 · step 40/120 · loss 3.250 · ppl 25.8 · eta 1m35s" in out

    deliver(aws, job_id, "Failed", reason="AlgorithmError: out of data")
    code, _, err = cli("jobs", "wait", job_id)
    assert code == 1 and err.strip() == f"error: job {job_id} failed: AlgorithmError: out of data"


def test_tables_are_aligned(cli, aws):
    config = grown_config(SIZES["debug"])
    Catalog(session=aws.session).register({
        "model_id": "m-123", "owner": "alice", "name": "support-bot", "kind": "trained", "parent_id": "base-debug",
        "job_id": "j0", "parameters": 3_290_000, "depth": 15, "perplexity": 191.28, "cost": "0.02",
        "config": config.model_dump(mode="json"), "dataset": DATASET, "created_at": "2026-01-02T00:00:00.000Z",
        "perplexity_on": {"source": "split", "dataset": DATASET, "windows": 64, "seq_len": 128, "tokens": "all",
                          "sha256": "ab" * 32}})
    code, out, _ = cli("models", "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["MODEL", "NAME", "KIND", "PARAMETERS", "DEPTH", "PERPLEXITY", "MEASURED", "ON", "COST",
                                "PARENT"]
    assert lines[-1].split() == ["m-123", "support-bot", "trained", "3.29M", "15", "191.28", "split", "64x128",
                                 DATASET, "$0.02", "base-debug"]
    code, out, _ = cli("models", "show", "m-123")
    assert code == 0 and f"191.28 on 64 held-out windows of 128 tokens of {DATASET}" in " ".join(out.split())
    base = next(line for line in lines if line.startswith("base-debug "))
    # right-aligned numbers end in the same column
    ends = {line.index(word) + len(word) for line, word in ((lines[0], "PARAMETERS"), (lines[-1], "3.29M"),
                                                            (base, human(SIZES["debug"].parameters())))}
    assert len(ends) == 1

    code, out, _ = cli("datasets", "list")
    assert code == 0 and out.splitlines()[1].split() == ["ds-aaaaaaaaaaaa", "notes", "ready", "2.05M", "310.00K",
                                                         "2026-01-01", "00:00:00"]


def test_json_output_is_the_api_answer(cli, api):
    job = _train(api, turns=1)
    code, out, _ = cli("--json", "jobs", "get", job["job_id"])
    assert code == 0 and json.loads(out) == api("GET", f"/jobs/{job['job_id']}")[1]
    code, out, _ = cli("--json", "estimate", "train", "--model", "base-debug", "--dataset", DATASET)
    quote = json.loads(out)
    assert code == 0 and quote["allowed_to_proceed"] is True
    assert Decimal(quote["estimate"]["total"]) == Decimal(job["estimate"]["total"])


def test_refusals_name_the_flag_and_the_fix(cli, tmp_path, monkeypatch):
    code, _, err = cli("jobs", "create", "train", "--model", "base-debug", "--dataset", "ds-bbbbbbbbbbbb")
    assert code == 1 and err.splitlines() == ["error: --dataset: no dataset 'ds-bbbbbbbbbbbb' in your catalog",
                                              "  `fusion datasets list` shows your dataset ids"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.jsonl").write_text('{"text": "x"}\n')
    code, _, err = cli("estimate", "train", "--model", "base-debug", "--dataset", "corpus.jsonl")
    assert code == 1 and "upload the file first with `fusion datasets upload corpus.jsonl`" in err
    code, _, err = cli("estimate", "train", "--model", "tiny", "--dataset", DATASET)
    assert code == 1 and err.splitlines() == ["error: --model: no model 'tiny' in your catalog",
                                              "  did you mean base-tiny?"]
    code, _, err = cli("estimate", "contract", "--model", "base-debug", "--contraction-ratio", "0.95")
    assert code == 1 and err.startswith("error: --contraction-ratio: Input should be less than or equal to 0.9")
    assert "hyperparams." not in err
    code, _, err = cli("estimate", "train", "--model", "base-debug", "--dataset", DATASET, "--output-name", "my model!")
    assert code == 1 and err.strip() == "error: --output-name: must be 1-64 of A-Z a-z 0-9 . _ -"
    code, _, err = cli("jobs", "get", "j1", token="not-a-jwt")
    assert code == 1 and err.strip() == "error: the bearer token is not a JWT (authorization)"


def test_a_refusal_not_in_the_api_shape_is_still_one_line(cli, monkeypatch):
    """API Gateway's JWT authorizer answers before the API does, in its own shape."""
    def authorizer(session, method, url, **kwargs):
        response = requests.Response()
        response.status_code, response.reason, response._content = 401, "Unauthorized", b'{"message":"Unauthorized"}'
        return response

    monkeypatch.setattr(requests.Session, "request", authorizer)
    code, _, err = cli("jobs", "list")
    assert code == 1 and err.strip() == "error: HTTP 401: Unauthorized"


def test_a_file_name_becomes_a_name_the_api_takes():
    from pathlib import Path

    from local.cli import dataset_name
    from shared.datasets import CreateDatasetRequest

    for file, name in (("café notes.jsonl", "caf--notes"), ("x" * 80 + ".txt", "x" * 64), (".jsonl", ".jsonl")):
        assert dataset_name(Path(file)) == name
        assert CreateDatasetRequest(name=dataset_name(Path(file))).name == name
    # a model's output_name and a dataset's name are the same rule
    assert (CreateDatasetRequest.model_json_schema()["properties"]["name"]["pattern"]
            == TrainSettings.model_json_schema()["properties"]["output_name"]["anyOf"][0]["pattern"])


def test_the_cli_has_words_for_every_status_a_job_waits_in():
    from local.cli import _waiting
    from shared.lifecycle import END_STATUSES, STATUS_RANK

    assert {s for s in STATUS_RANK if _waiting(s)} == set(STATUS_RANK) - set(END_STATUSES)


def test_an_answer_not_of_its_model_is_one_clear_error(aws, server):
    from local.cli import ApiError, Client
    from shared.responses import Job

    with pytest.raises(ApiError, match=r"GET /console/config.json with a body that is not a Job \(job_id: Field required\)"):
        Client(server).call("GET", "/console/config.json", Job)


def test_a_mistyped_flag_shows_its_command_and_the_flag_it_meant(cli, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["jobs", "create", "train", "--model", "base-debug", "--dataset", DATASET, "--seq-lne", "64"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("usage: fusion jobs create train")
    assert err.strip().endswith("unrecognized argument --seq-lne: did you mean --seq-len?")


def test_json_anywhere_gives_one_document(cli, api, aws):
    job = _train(api)
    code, out, _ = cli("jobs", "get", job["job_id"], "--json")
    assert code == 0 and json.loads(out)["job_id"] == job["job_id"]
    deliver(aws, job["job_id"], "Failed", reason="AlgorithmError: out of data")
    code, out, err = cli("jobs", "wait", "--json", job["job_id"])
    ended = json.loads(out)  # one document, no progress lines around it
    assert code == 1 and ended["status"] == "failed" and err == ""
    code, out, err = cli("estimate", "contract", "--model", "base-debug", "--json")  # a base: refused
    assert code == 1 and out == "" and err.startswith("error: --model: base-debug is a base model")
    assert cli.sent[-1][2] == {"type": "contract", "hyperparams": {"source_model_id": "base-debug"}}


def test_ctrl_c_while_following_says_the_job_goes_on(cli, api, monkeypatch):
    job_id = _train(api)["job_id"]

    def interrupted(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr("local.cli.time.sleep", interrupted)
    code, _, err = cli("jobs", "wait", job_id)
    assert code == 130
    assert f"the job goes on" in err and f"fusion jobs wait {job_id}" in err and f"fusion jobs cancel {job_id}" in err
    assert api("GET", f"/jobs/{job_id}")[1]["status"] == "queued"


def test_the_estimate_adds_up_and_says_what_runs(cli):
    code, out, _ = cli("estimate", "train", "--model", "base-debug", "--dataset", DATASET, "--train-steps", "12")
    rows = {line[:16].strip(): line[16:].strip() for line in out.splitlines()}
    assert code == 0
    assert rows["runs"].startswith("1 turn x 1 cycle of 12 steps, seq_len 256")  # not 6 cycles of 2
    assert rows["billed tokens"] == "3,072 (turns x steps x seq_len)"
    assert rows["trained tokens"] == "24,576 (billed tokens x 8 sequences a step)"
    parts = [Decimal(rows[k].split()[0].lstrip("$")) for k in ("training cost", "growth fee")]
    assert Decimal(rows["sum"].lstrip("$")) == sum(parts)
    assert rows["minimum charge"].startswith("$0.01")
    assert rows["total"] in ("$0.01 (the minimum charge)", "$0.01 (the sum rounded to cents)")
    assert rows["eta on AWS"].endswith("of it starting the instance") and "ml.g5" in rows["eta on AWS"]


def test_small_losses_keep_their_digits_and_a_narrow_bar_fits_80_columns():
    from io import StringIO

    from rich.console import Console

    from local.cli import _follow_with_bar, loss_words

    assert (loss_words(3.25), loss_words(2.1e-5), loss_words(0.0123)) == ("3.250", "2.1e-05", "0.0123")

    class OneJob:
        def __init__(self):
            self.calls = 0

        def call(self, method, path, answer):
            self.calls += 1
            progress = Progress(job_id="j1", job_type="contract", turn=1, turns=1, cycle=1, cycles=1, step=4,
                                total_steps=10, loss=2.1e-5, perplexity=None, tokens_trained=4 * 256, tokens_per_second=10.0,
                                eta_seconds=600.0, updated_at=now())
            status = "running" if self.calls == 1 else "completed"
            return answer.model_validate({**JOB_FIELDS, "status": status, "progress": progress.model_dump(mode="json")})

    screen = StringIO()
    console = Console(file=screen, width=80, force_terminal=True, color_system=None)
    job = _follow_with_bar(OneJob(), "j1", console, 0, None)
    assert job.status == "completed"
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "\n", screen.getvalue().replace("\r", "\n"))
    lines = [line for line in plain.splitlines() if line.strip()]
    final = lines[-1]
    assert all(len(line) <= 80 for line in lines)
    assert "100%" in final and "all 10 steps" in final and "step 4/10" not in final  # not the stale step


JOB_FIELDS = {"job_id": "j1", "type": "contract", "owner": "alice", "model": "m-1", "dataset": None, "settings": {},
              "estimate": {"job_type": "contract", "training_tokens": 2560, "parameters": 1000, "tier": "xs",
                           "usd_per_million_tokens": "0.40", "training_cost": "0.001", "growth_parameters": 0,
                           "growth_fee": "0", "contraction_fee": "1.00", "total": "1.00", "instance_type": "ml.g5.xlarge",
                           "instance_count": 1, "eta_seconds": 600, "max_runtime_seconds": 3600},
              "warnings": [], "training_job_name": None, "output_model_id": "m-2", "failure_reason": None,
              "bill": None, "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z"}


def test_the_format_comes_from_the_content(tmp_path):
    from local.cli import _array_as_jsonl, detect_format

    (tmp_path / "lines.json").write_text('{"text": "a"}\n{"text": "b"}\n')
    (tmp_path / "array.json").write_text('[{"text": "a"}, "b"]')
    (tmp_path / "notes.json").write_text("plain words, not JSON\n")
    (tmp_path / "code.txt").write_text('{ not: json }\n')
    assert detect_format(tmp_path / "lines.json")[0] == "jsonl"
    assert detect_format(tmp_path / "array.json")[0] == "array"
    assert detect_format(tmp_path / "notes.json")[0] == "text"
    assert detect_format(tmp_path / "code.txt")[0] == "text"
    lines = _array_as_jsonl(tmp_path / "array.json", tmp_path).read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"text": "a"}, {"text": "b"}]


def test_delete_a_model_and_its_child_shows_the_parent_deleted(cli, aws):
    catalog = Catalog(session=aws.session)
    on = {"source": "split", "dataset": DATASET, "windows": 8, "seq_len": 64, "tokens": "all", "sha256": "ab" * 32}
    for model_id, parent, parameters, perplexity, digest in (("m-parent", "base-debug", 1000, 20.0, "ab"),
                                                             ("m-child", "m-parent", 790, 21.0, "ab"),
                                                             ("m-elsewhere", "m-parent", 790, 21.0, "cd")):
        catalog.register({"model_id": model_id, "owner": "alice", "name": model_id, "kind": "trained",
                          "parent_id": parent, "job_id": "j0", "parameters": parameters, "perplexity": perplexity,
                          "perplexity_on": {**on, "sha256": digest * 32}, "created_at": "2026-01-02T00:00:00.000Z"})
    code, out, _ = cli("models", "show", "m-child")
    assert code == 0 and "m-parent, parameters -21%, perplexity +5.0%" in out
    # Perplexities on other windows (another seq_len, split or tokenizer) are not compared.
    code, out, _ = cli("models", "show", "m-elsewhere")
    assert code == 0 and "m-parent, parameters -21%, perplexity on other windows" in out
    code, out, _ = cli("models", "delete", "m-parent")
    assert code == 0 and out.strip() == "model m-parent deleted; models made from it still name it as their parent"
    code, out, _ = cli("models", "show", "m-child")
    assert code == 0 and "m-parent (deleted)" in out
    code, out, _ = cli("models", "list")
    assert "m-parent " not in out and "m-child" in out
    code, out, _ = cli("datasets", "delete", DATASET, "--json")
    assert code == 0 and json.loads(out)["status"] == "deleted"
