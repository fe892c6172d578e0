"""The API's console routes (static files, sign-in settings) and a job's metrics log."""

import json

import pytest

from functions.api import console
from local.server import api_event
from shared.outputs import checkpoint_prefix, kept_metrics_log_key, metrics_log_key, progress_key
from shared.store import Jobs
from training_image.train import METRICS_LOG
from tests.conftest import LambdaContext


def _raw(method: str, path: str) -> dict:
    from functions.api.app import lambda_handler

    return lambda_handler(api_event(method, path, claims={"sub": "alice"}), LambdaContext())


@pytest.mark.parametrize("path", ["/console", "/console/index.html"])
def test_the_console_page_is_served_with_a_strict_content_policy(aws, path):
    answer = _raw("GET", path)
    assert answer["statusCode"] == 200
    assert answer["headers"]["Content-Type"].startswith("text/html")
    assert "<title>Fusion Training Console</title>" in answer["body"]
    policy = answer["headers"]["content-security-policy"]
    assert "script-src 'self'" in policy and "default-src 'self'" in policy


def test_every_console_file_is_served_with_its_type_and_nothing_else(aws):
    shipped = sorted(p.name for p in console.CONSOLE_DIR.iterdir())
    assert {"index.html", "app.js", "style.css"} <= set(shipped)
    for name in shipped:
        answer = _raw("GET", f"/console/{name}")
        assert answer["statusCode"] == 200, name
        assert answer["headers"]["Content-Type"] == console.TYPES[name[name.rindex("."):]]
    assert _raw("GET", "/console/nope.js")["statusCode"] == 404
    assert _raw("GET", "/console/..%2Fpyproject.toml")["statusCode"] == 404


def test_console_files_are_compressed_and_revalidated_by_etag(aws):
    import base64
    import gzip

    from functions.api.app import lambda_handler

    def get(headers):
        return lambda_handler(api_event("GET", "/console/app.js", headers=headers, claims={"sub": "alice"}),
                              LambdaContext())

    plain = get({})
    etag = plain["headers"]["etag"]
    assert plain["statusCode"] == 200 and plain["headers"]["cache-control"] == "no-cache" and etag.startswith('"')
    packed = get({"accept-encoding": "gzip, deflate, br"})
    assert packed["headers"]["Content-Encoding"] == "gzip" and packed["isBase64Encoded"]
    unpacked = gzip.decompress(base64.b64decode(packed["body"])).decode()
    assert unpacked == plain["body"] and len(base64.b64decode(packed["body"])) < len(plain["body"]) / 2
    again = get({"if-none-match": etag})
    assert again["statusCode"] == 304 and again["body"] == "" and again["headers"]["etag"] == etag
    assert get({"if-none-match": '"stale"'})["statusCode"] == 200


def test_the_root_sends_browsers_to_the_console(aws):
    answer = _raw("GET", "/")
    assert answer["statusCode"] == 302 and answer["headers"]["location"] == console.CONSOLE_PATH


def test_no_sign_in_locally_and_pkce_settings_when_deployed(aws, api, monkeypatch):
    assert api("GET", "/console/config.json") == (200, {"auth": None})
    monkeypatch.setenv("FUSION_CONSOLE_CLIENT_ID", "client-1")
    monkeypatch.setenv("FUSION_CONSOLE_ISSUER", "https://issuer.example")
    monkeypatch.setenv("FUSION_CONSOLE_AUTHORIZE_URL", "https://login.example/oauth2/authorize")
    monkeypatch.setenv("FUSION_CONSOLE_TOKEN_URL", "https://login.example/oauth2/token")
    status, body = api("GET", "/console/config.json")
    assert status == 200 and body["auth"] == {
        "client_id": "client-1", "issuer": "https://issuer.example", "scope": "openid",
        "authorize_url": "https://login.example/oauth2/authorize", "token_url": "https://login.example/oauth2/token"}


def test_the_console_reads_settings_from_the_openapi_document(aws, api):
    status, spec = api("GET", "/openapi.json")
    schemas = spec["components"]["schemas"]
    train, contract = schemas["TrainSettings"]["properties"], schemas["ContractSettings"]["properties"]
    assert train["turns"]["default"] == 1 and train["turns"]["maximum"] == 10
    assert "2 recommended" in train["turns"]["description"]
    assert "below 500 under-trains" in train["steps_per_cycle"]["description"]
    ratio = contract["contraction_ratio"]
    assert (ratio["minimum"], ratio["maximum"], ratio["default"]) == (0.1, 0.9, 0.5)
    assert ratio["x-marks"] == {"0.25": "conservative", "0.5": "balanced", "0.75": "aggressive"}
    assert "/jobs/{job_id}/metrics" in spec["paths"]


def _job(aws, api):
    status, job = api("POST", "/jobs", {"type": "train", "model": "base-debug", "dataset": _dataset(aws),
                                       "hyperparams": {"train_steps": 20, "seq_len": 64}})
    assert status == 201, job
    return job


def _dataset(aws) -> str:
    aws.session.client("dynamodb").put_item(TableName=aws.env["DATASETS_TABLE"], Item={
        "dataset_id": {"S": "ds-aaaaaaaaaaaa"}, "owner": {"S": "alice"}, "status": {"S": "ready"},
        "s3_uri": {"S": f"s3://{aws.env['DATA_BUCKET']}/alice/datasets/ds-aaaaaaaaaaaa/data.jsonl"},
        "created_at": {"S": "2026-01-01T00:00:00Z"}, "name": {"S": "d"}})
    return "ds-aaaaaaaaaaaa"


# What the trainer writes on each line besides the figures a case sets (shared.contracts.LogRecord).
LOGGED = {"step": {"turn": 1, "cycle": 1, "loss": 1.0, "lr": 1e-4, "time": "2026-01-01T00:00:00+00:00"},
          "eval": {"turn": 1, "cycle": 1, "steps": 10, "loss": 1.0, "heldout_loss": 1.0, "perplexity": 2.7,
                   "tokens": 2560, "time": "2026-01-01T00:00:00+00:00"}}


def _log(aws, job_id: str, lines: list) -> None:
    body = "".join((line if isinstance(line, str) else json.dumps({**LOGGED[line["kind"]], **line})) + "\n"
                   for line in lines)
    aws.session.client("s3").put_object(Bucket=aws.env["ARTIFACTS_BUCKET"], Key=metrics_log_key(job_id),
                                        Body=body.encode())


def test_metrics_log_lives_where_the_trainer_writes_it():
    assert metrics_log_key("j") == checkpoint_prefix("j") + METRICS_LOG  # the checkpoint folder's sync
    assert metrics_log_key("j").rsplit("/", 1)[0] == progress_key("j").rsplit("/", 1)[0]


def test_a_jobs_curve_before_and_after_the_trainer_logs(aws, api):
    job = _job(aws, api)
    status, curve = api("GET", f"/jobs/{job['job_id']}/metrics")
    assert status == 200 and curve["steps"] == [] and curve["evals"] == [] and curve["status"] == "queued"
    _log(aws, job["job_id"], [
        {"kind": "step", "step": 10, "loss": 7.0}, {"kind": "step", "step": 20, "loss": 6.5},
        {"kind": "eval", "step": 20, "cycle": 1, "perplexity": 600.0},
        '{"kind": "step", "step": 3',  # cut by a sync in mid-write
        {"kind": "step", "step": 20, "loss": 6.4},  # logged again after a resume: the last line wins
    ])
    status, curve = api("GET", f"/jobs/{job['job_id']}/metrics")
    assert status == 200
    assert [(r["step"], r["loss"]) for r in curve["steps"]] == [(10, 7.0), (20, 6.4)]
    assert [(r["step"], r["perplexity"]) for r in curve["evals"]] == [(20, 600.0)]


def test_a_long_curve_is_thinned_keeping_its_last_point(aws, api):
    job = _job(aws, api)
    _log(aws, job["job_id"], [{"kind": "step", "step": s, "loss": 1.0 / s} for s in range(1, 2502)])
    status, curve = api("GET", f"/jobs/{job['job_id']}/metrics", query="max_points=100")
    assert status == 200 and curve["logged_steps"] == 2501
    assert len(curve["steps"]) <= 101 and curve["steps"][0]["step"] == 1 and curve["steps"][-1]["step"] == 2501
    assert api("GET", f"/jobs/{job['job_id']}/metrics", query="max_points=1")[0] == 422


def test_another_tenants_curve_is_not_found(aws, api):
    job = _job(aws, api)
    assert api("GET", f"/jobs/{job['job_id']}/metrics", tenant="bob")[0] == 404
    assert api("GET", "/jobs/no-such-job/metrics")[0] == 404
    assert Jobs(session=aws.session).get(job["job_id"], "alice") is not None


def test_parallel_requests_to_the_local_server_each_get_their_own_answer(server):
    from concurrent.futures import ThreadPoolExecutor

    import requests

    names = sorted(p.name for p in console.CONSOLE_DIR.iterdir()) * 4
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda n: requests.get(f"{server}/console/{n}", timeout=30), names))
    for name, answer in zip(names, answers):
        assert answer.headers["content-type"] == console.TYPES[name[name.rindex("."):]], name
        assert answer.text == (console.CONSOLE_DIR / name).read_text(encoding="utf-8")


def _api_function():
    from local.resources import load_template

    return load_template()["Resources"]["ApiFunction"]["Properties"]


def test_the_template_serves_the_console_publicly_and_everything_else_behind_the_authorizer():
    events = _api_function()["Events"]
    public = {e["Properties"]["Path"] for e in events.values() if e["Properties"].get("Auth", {}).get("Authorizer") == "NONE"}
    assert public == {"/", "/console", "/console/{proxy+}", "/openapi.json", "/docs"}
    paths = {e["Properties"]["Path"] for e in events.values()}
    assert "/jobs/{job_id}/metrics" in paths


def test_the_api_may_read_the_metrics_log_and_nothing_else_of_a_jobs_checkpoints():
    from fnmatch import fnmatch

    statements = [s for p in _api_function()["Policies"] if "Statement" in p for s in p["Statement"]]
    [read] = [s for s in statements if s["Sid"] == "ReadProgress"]
    patterns = [r.value.replace("${ArtifactsBucket.Arn}/", "") for r in read["Resource"]]
    for key in (metrics_log_key("abc"), progress_key("abc"), kept_metrics_log_key("abc")):
        assert any(fnmatch(key, p) for p in patterns), key
    assert not any(fnmatch(checkpoint_prefix("abc") + "sharded/step-1/.metadata", p) for p in patterns)


def test_the_deployed_console_signs_in_where_the_authorizer_trusts():
    from local.resources import load_template

    template = load_template()
    env = _api_function()["Environment"]["Variables"]
    assert set(env) == set(console.AUTH_ENV.values()) - {"FUSION_CONSOLE_SCOPE"}
    jwt = template["Resources"]["HttpApi"]["Properties"]["Auth"]["Authorizers"]["FusionJwt"]["JwtConfiguration"]
    assert repr(jwt["issuer"]) == repr(env["FUSION_CONSOLE_ISSUER"])  # the same !If: the pool or JwtIssuer
    client = template["Resources"]["ConsoleUserPoolClient"]["Properties"]
    assert client["GenerateSecret"] is False and client["AllowedOAuthFlows"] == ["code"]
