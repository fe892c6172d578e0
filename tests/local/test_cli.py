"""The CLI's own behaviour against a scripted API: what it sends, and how it shows answers and refusals."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from local.cli import main


@pytest.fixture
def api():
    """A stand-in API: `answers` maps "METHOD /path" to (status, body); requests are recorded."""
    answers: dict[str, tuple[int, dict]] = {}
    seen: list[tuple[str, str, dict | None, str | None]] = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            seen.append((self.command, self.path, body, self.headers.get("authorization")))
            status, payload = answers.get(f"{self.command} {self.path}", (404, {"error": {
                "code": "not_found", "message": f"no route {self.command} {self.path}", "details": []}}))
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _answer

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", answers, seen
    server.shutdown()
    server.server_close()


def _job(status: str, **extra) -> dict:
    return {"job_id": "j1", "type": "train", "status": status, "model": "base-tiny", "dataset": "ds-1",
            "settings": {}, "estimate": {"total": "0.50", "eta_seconds": 400}, "warnings": [], "bill": None,
            "output_model_id": None, "training_job_name": "fusion-j1", "failure_reason": None, "progress": None,
            "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z", **extra}


def test_cancel_reports_the_api_answer(api, capsys):
    url, answers, seen = api
    answers["POST /jobs/j1/cancel"] = (202, _job("cancelling"))
    assert main(["--api-url", url, "--token", "t0k", "jobs", "cancel", "j1"]) == 0
    assert capsys.readouterr().out.strip() == "job j1 cancelling"
    assert seen[-1][:2] == ("POST", "/jobs/j1/cancel") and seen[-1][3] == "Bearer t0k"

    answers["POST /jobs/j1/cancel"] = (409, {"error": {"code": "job_not_cancellable", "message": "job j1 is completed",
                                                       "details": [{"field": "job_id", "message": "it has ended"}]}})
    assert main(["--api-url", url, "jobs", "cancel", "j1"]) == 1
    assert capsys.readouterr().err.strip() == "error: job j1 is completed (job_id: it has ended)"


def test_create_sends_only_the_given_settings(api, capsys):
    url, answers, seen = api
    answers["POST /jobs"] = (201, _job("queued", warnings=["steps_per_cycle=100 is below 500: the run under-trains"]))
    code = main(["--api-url", url, "jobs", "create", "train", "--model", "base-tiny", "--dataset", "ds-1",
                 "--turns", "2", "--steps-per-cycle", "100", "--lr", "0.001"])
    assert code == 0
    assert seen[-1][2] == {"type": "train", "model": "base-tiny", "dataset": "ds-1",
                           "hyperparams": {"turns": 2, "steps_per_cycle": 100, "lr": 0.001}}
    out = capsys.readouterr().out
    assert "job j1 queued: estimate $0.50, eta 6m40s" in out and "under-trains" in out


def test_wait_follows_progress_until_the_end(api, capsys):
    url, answers, _ = api
    progress = {"turn": 1, "turns": 2, "cycle": 3, "cycles": 6, "step": 40, "total_steps": 120, "loss": 3.25,
                "perplexity": 25.8, "eta_seconds": 95}
    answers["GET /jobs/j1"] = (200, _job("running", progress=progress))
    code = main(["--api-url", url, "jobs", "wait", "j1", "--timeout", "1.5"])
    captured = capsys.readouterr()
    assert code == 1 and "still running" in captured.err
    assert "turn 1/2 · cycle 3/6 · step 40/120 · loss 3.250 · ppl 25.8 · eta 1m35s" in captured.out

    answers["GET /jobs/j1"] = (200, _job("failed", failure_reason="AlgorithmError: out of data"))
    assert main(["--api-url", url, "jobs", "wait", "j1"]) == 1
    assert capsys.readouterr().err.strip() == "error: job j1 failed: AlgorithmError: out of data"


def test_tables_are_aligned(api, capsys):
    url, answers, _ = api
    answers["GET /models"] = (200, {"models": [
        {"model_id": "base-tiny", "name": "base-tiny", "kind": "base", "parameters": 2_740_000, "depth": 12,
         "perplexity": None, "cost": None, "parent_id": None},
        {"model_id": "m-123", "name": "support-bot", "kind": "trained", "parameters": 3_290_000, "depth": 15,
         "perplexity": 191.28, "cost": "0.02", "parent_id": "base-tiny"}]})
    assert main(["--api-url", url, "models", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["MODEL", "NAME", "KIND", "PARAMETERS", "DEPTH", "PERPLEXITY", "COST", "PARENT"]
    assert lines[2].split() == ["m-123", "support-bot", "trained", "3.29M", "15", "191.28", "$0.02", "base-tiny"]
    # right-aligned numbers end in the same column
    assert lines[1].index("2.74M") + 5 == lines[2].index("3.29M") + 5 == lines[0].index("PARAMETERS") + 10


def test_non_json_refusal_is_still_one_line(api, capsys):
    url, answers, _ = api
    answers["GET /jobs"] = (401, {"message": "Unauthorized"})  # API Gateway's JWT authorizer answers like this
    assert main(["--api-url", url, "jobs", "list"]) == 1
    assert capsys.readouterr().err.strip() == "error: HTTP 401: Unauthorized"
