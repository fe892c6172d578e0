"""The local HTTP server: real HTTP on loopback into the same Lambda handler."""

import json
import threading

import pytest

from local.server import api_event, claims_of
from tests.conftest import http, ready_dataset, unsigned_jwt


def test_claims_come_from_the_bearer_token():
    assert claims_of(None) == {"sub": "local"}
    assert claims_of(f"Bearer {unsigned_jwt({'sub': 'alice', 'aud': 'x'})}")["sub"] == "alice"
    with pytest.raises(ValueError):
        claims_of("Bearer not-a-jwt")
    with pytest.raises(ValueError):
        claims_of(f"Bearer {unsigned_jwt({'aud': 'x'})}")
    for other_scheme in ("Basic YWxpY2U6cHc=", "", "Bearer ", "Token x"):
        with pytest.raises(ValueError):
            claims_of(other_scheme)


def test_api_event_is_an_http_api_v2_event():
    event = api_event("POST", "/jobs", query="dry_run=true&a=1&a=2", body="{}", claims={"sub": "bob"})
    assert event["version"] == "2.0" and event["requestContext"]["http"]["method"] == "POST"
    assert event["queryStringParameters"] == {"dry_run": "true", "a": "1,2"}
    assert event["requestContext"]["authorizer"]["jwt"]["claims"]["sub"] == "bob"


def test_jobs_over_http_are_scoped_by_the_token(server, aws):
    body = {"type": "train", "model": "base-debug", "dataset": ready_dataset(aws, "alice")}
    status, job = http(f"{server}/jobs", "POST", body, token=unsigned_jwt({"sub": "alice"}))
    assert status == 201 and job["owner"] == "alice"
    assert http(f"{server}/jobs/{job['job_id']}", token=unsigned_jwt({"sub": "alice"}))[0] == 200
    assert http(f"{server}/jobs/{job['job_id']}")[0] == 404  # no token: tenant "local"
    status, error = http(f"{server}/jobs", "POST", {"type": "train"}, token=unsigned_jwt({"sub": "alice"}))
    assert status == 422 and {d["field"] for d in error["error"]["details"]} == {"model", "dataset"}


def test_a_garbled_token_is_401(server):
    assert http(f"{server}/models", token="garbage")[0] == 401


def test_a_sub_that_cannot_be_a_tenant_is_401(server):
    for claims in ({"sub": 5}, {"sub": ["alice"]}, {"sub": {"a": 1}}, {"sub": True}, {"sub": "x" * 300}):
        status, body = http(f"{server}/jobs", token=unsigned_jwt(claims))
        assert status == 401 and body["error"]["details"][0]["field"] == "authorization", claims


def test_unknown_methods_get_the_apis_json_error(server):
    for method in ("OPTIONS", "TRACE", "BREW", "PROPFIND", "DELETE"):
        status, body = _raw(server, method, "/jobs")
        assert status == 404 and body["error"]["code"] == "not_found", (method, body)
    status, headers, data = _raw_response(server, "HEAD", "/models")  # no route, and no body after the headers
    assert status == 404 and data == b"" and headers["content-type"] == "application/json"


def test_a_content_length_that_is_not_a_count_is_400(server):
    for length in ("abc", "-1", "1.5"):
        status, body = _raw(server, "POST", "/jobs", {"content-length": length, "content-type": "application/json"})
        assert status == 400 and body["error"]["details"][0]["field"] == "content-length", length


def test_fifty_concurrent_clients_are_all_answered(aws):
    """50 clients connect while the server is busy (not accepting): the listen queue holds every
    one (the standard library's backlog of 5 would drop or reset the rest), then all are answered."""
    import socket

    from local.server import make_server

    httpd = make_server("127.0.0.1", 0)
    clients, serving = [], threading.Thread(target=httpd.serve_forever, daemon=True)
    try:
        for _ in range(50):
            client = socket.socket()
            client.settimeout(1.0)
            client.connect(httpd.server_address)  # completes only if the listen queue has room
            clients.append(client)
        serving.start()
        for client in clients:
            client.sendall(b"GET /models HTTP/1.1\r\nHost: local\r\nConnection: close\r\n\r\n")
        for client in clients:
            client.settimeout(30)
            answer = b"".join(iter(lambda: client.recv(65536), b""))
            assert answer.split(b"\r\n", 1)[0].endswith(b"200 OK") and b'"base-tiny"' in answer
    finally:
        for client in clients:
            client.close()
        if serving.is_alive():
            httpd.shutdown()
        httpd.server_close()


def _raw_response(server: str, method: str, path: str, headers: dict | None = None):
    import http.client
    from urllib.parse import urlsplit

    url = urlsplit(server)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    connection.putrequest(method, path)
    for key, value in (headers or {}).items():
        connection.putheader(key, value)
    connection.endheaders()
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


def _raw(server: str, method: str, path: str, headers: dict | None = None):
    status, _, data = _raw_response(server, method, path, headers)
    return status, json.loads(data)


def test_models_over_http(server):
    status, body = http(f"{server}/models")
    assert status == 200 and "base-tiny" in {m["model_id"] for m in body["models"]}


def test_start_in_process_aws_serves_the_seeded_catalog():
    """In a fresh process (the mock stays on for the life of the process): resources and base models."""
    import subprocess
    import sys

    code = (
        "from local.server import start_in_process_aws, api_event\n"
        "from local.stack import LambdaContext\n"
        "env = start_in_process_aws()\n"
        "from functions.api.app import lambda_handler\n"
        "import json\n"
        "models = json.loads(lambda_handler(api_event('GET', '/models'), LambdaContext('fusion-api'))['body'])['models']\n"
        "print(env['JOBS_TABLE'], sorted(m['model_id'] for m in models))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "POWERTOOLS_LOG_LEVEL": "WARNING"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "fusion-JobsTable" and "'base-debug'," in out.stdout


# --- the edge: API Gateway's limits, and one client never holds up another ---------------------


def _exchange(server: str, request: bytes, *, half_close: bool = False, timeout: float = 10) -> tuple[int, bytes]:
    """Send raw bytes on a fresh connection; the answer's status and whole text (the server closes)."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(server)
    with socket.create_connection((url.hostname, url.port), timeout=timeout) as client:
        client.sendall(request)
        if half_close:
            client.shutdown(socket.SHUT_WR)
        answer = b"".join(iter(lambda: client.recv(65536), b""))
    return int(answer.split(b" ", 2)[1]), answer


def _post_head(length: str | list[str], extra: str = "") -> bytes:
    lengths = length if isinstance(length, list) else [length]
    return ("POST /jobs HTTP/1.1\r\nHost: local\r\ncontent-type: application/json\r\n"
            + "".join(f"Content-Length: {n}\r\n" for n in lengths) + extra + "\r\n").encode()


def test_a_body_over_api_gateways_payload_limit_is_413_unread(server):
    from local.server import MAX_BODY_BYTES

    assert MAX_BODY_BYTES == 10 * 1024 * 1024  # API Gateway HTTP API: "Payload size 10 MB"
    for length in (10**12, MAX_BODY_BYTES + 1):
        status, answer = _exchange(server, _post_head(str(length)))
        assert status == 413 and b"payload_too_large" in answer and str(MAX_BODY_BYTES).encode() in answer
    assert http(f"{server}/models")[0] == 200  # and the server is none the worse


def test_repeated_short_or_chunked_lengths_are_refused(server):
    status, answer = _exchange(server, _post_head(["2", "2"]) + b"{}")
    assert status == 400 and b"one content-length header" in answer
    status, answer = _exchange(server, _post_head("100") + b'{"type": "train"}', half_close=True)
    assert status == 400 and b"after 17 of its 100 declared bytes" in answer
    status, answer = _exchange(server, _post_head("2", "Transfer-Encoding: chunked\r\n") + b"{}")
    assert status == 411


@pytest.mark.parametrize("authorization", ["Basic YWxpY2U6cHc=", "Bearer", "Bearer   ", "Token abc", "alice",
                                           "Digest username=alice", ["Bearer a.b.c", "Bearer a.b.c"]])
def test_any_authorization_but_one_bearer_token_is_401(server, authorization):
    values = authorization if isinstance(authorization, list) else [authorization]
    request = "GET /jobs HTTP/1.1\r\nHost: local\r\nConnection: close\r\n" + "".join(
        f"Authorization: {v}\r\n" for v in values) + "\r\n"
    status, answer = _exchange(server, request.encode())
    assert status == 401 and b'"field": "authorization"' in answer, answer


def test_a_slow_client_times_out_without_holding_up_another(server, monkeypatch):
    import time

    from local import server as local_server

    monkeypatch.setattr(local_server._Handler, "timeout", 3.0)
    stalled: dict = {}

    def slow():  # declares a body and never sends it
        stalled["start"] = time.monotonic()
        stalled["status"], stalled["answer"] = _exchange(server, _post_head("50"))
        stalled["took"] = time.monotonic() - stalled["start"]

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.2)
    assert http(f"{server}/models")[0] == 200
    assert thread.is_alive()  # answered while the slow one still waits
    thread.join(15)
    assert stalled["status"] == 408 and 2.9 < stalled["took"] < 12, stalled
