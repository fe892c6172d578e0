"""Schemathesis over every operation of the served spec, stateless and stateful, with the figures.

    .venv/bin/python bench/fuzz_api.py [--examples 150] [--scenarios 150] [--steps 10]

The local HTTP server on loopback (moto in-process, tables and buckets from template.yaml), two
tenants with a ready dataset and a trained model each. The spec is fetched from the server and,
for this run only, narrowed so valid requests name real ids (a base model, the tenant's dataset
and model) and linked (POST /jobs -> GET /jobs/{job_id} and its cancel, POST /datasets -> GET
/datasets/{dataset_id}), so POST /jobs gets past its 404s and the stateful phase follows real
jobs. Every response is checked: no 5xx, and status code, content type and body keep to the spec.
Then an edge phase sends what the schema cannot: the hostile subs of the tenancy tests (every
separator and escape character, `public`, the raw form of another tenant's prefix) against each
tenant route, and the malformed framing of the HTTP edge (a body over API Gateway's payload limit,
repeated, short or chunked lengths, non-Bearer Authorization). Every answer there must be the one
named beside it. Prints requests, 5xx and spec breaks per phase, and the statuses of each
operation; exits non-zero on any 5xx, spec break or edge answer that is not the one expected.
"""

from __future__ import annotations

import argparse
import base64
import collections
import copy
import json
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TENANTS = ("alice", "bob")


def _jwt(sub: str) -> str:
    encode = lambda part: base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode()
    return f"{encode({'alg': 'none'})}.{encode({'sub': sub})}."


def _seed(env: dict[str, str]) -> None:
    """alice and bob: a ready dataset (ds-aaaaaaaaaaaa, ds-bbbbbbbbbbbb) and a trained model each."""
    import boto3

    from shared.datasets import dataset_key
    from shared.shapes import SIZES, grown_config
    from shared.store import Catalog

    session = boto3.session.Session()
    # base-debug and base-tiny published (placeholder bytes: nothing launches in this run, and
    # admission only looks that the archive is there); the other sizes stay not available.
    for size in ("debug", "tiny"):
        session.client("s3").put_object(Bucket=env["ARTIFACTS_BUCKET"], Key=f"base-models/{size}/model.tar.gz",
                                        Body=b"placeholder")
    grown = grown_config(SIZES["debug"])
    for owner in TENANTS:
        ds = f"ds-{owner[0] * 12}"
        session.client("dynamodb").put_item(TableName=env["DATASETS_TABLE"], Item={
            "dataset_id": {"S": ds}, "owner": {"S": owner}, "status": {"S": "ready"}, "name": {"S": "d"},
            "s3_uri": {"S": f"s3://{env['DATA_BUCKET']}/{dataset_key(owner, ds, 'jsonl')}"},
            "created_at": {"S": "2026-01-01T00:00:00Z"}})
        Catalog(session=session).register({
            "model_id": f"m-{owner}", "owner": owner, "name": f"m-{owner}", "kind": "trained",
            "parent_id": "base-debug", "job_id": "j0", "parameters": grown.parameters(), "depth": grown.n_layers,
            "perplexity": 20.0, "artifact_uri": f"s3://{env['ARTIFACTS_BUCKET']}/jobs/j0/model.tar.gz",
            "cost": "0.62", "config": grown.model_dump(mode="json"), "dataset": ds, "created_at": "t"})


def _narrowed(spec: dict, data_bucket: str) -> dict:
    """The spec with real ids for the id fields and links between the operations that share ids."""
    spec = copy.deepcopy(spec)
    schemas = spec["components"]["schemas"]
    datasets = [f"ds-{t[0] * 12}" for t in TENANTS] + [f"s3://{data_bucket}/alice/datasets/ds-aaaaaaaaaaaa/data.jsonl",
                                                       f"s3://{data_bucket}/alice/corpus.jsonl"]
    schemas["TrainJobRequest"]["properties"]["model"] = {"type": "string",
                                                         "enum": ["base-debug", "base-tiny", "base-small", "m-alice"]}
    schemas["TrainJobRequest"]["properties"]["dataset"] = {"type": "string", "enum": datasets}
    schemas["ContractJobRequest"]["properties"]["dataset"] = {"type": "string", "enum": datasets}
    schemas["ContractSettings"]["properties"]["source_model_id"] = {"type": "string",
                                                                     "enum": ["m-alice", "m-bob", "base-debug"]}
    ops = {(method.upper(), path): op for path, item in spec["paths"].items() for method, op in item.items()}

    def link(source: tuple[str, str], status: str, target: tuple[str, str], parameter: str, pointer: str) -> None:
        links = ops[source]["responses"][status].setdefault("links", {})
        links[f"{target[0]} {target[1]}"] = {"operationId": ops[target]["operationId"],
                                             "parameters": {parameter: f"$response.body#{pointer}"}}

    for target in (("GET", "/jobs/{job_id}"), ("POST", "/jobs/{job_id}/cancel")):
        link(("POST", "/jobs"), "201", target, "job_id", "/job_id")
    link(("GET", "/jobs"), "200", ("GET", "/jobs/{job_id}"), "job_id", "/jobs/0/job_id")
    link(("POST", "/datasets"), "201", ("GET", "/datasets/{dataset_id}"), "dataset_id", "/dataset_id")
    link(("GET", "/models"), "200", ("GET", "/models/{model_id}"), "model_id", "/models/0/model_id")
    return spec


class Tally:
    def __init__(self) -> None:
        self.requests = collections.Counter()
        self.server_errors = collections.Counter()
        self.breaks: collections.Counter[str] = collections.Counter()
        self.statuses: collections.Counter[tuple[str, int]] = collections.Counter()
        self.samples: list[str] = []
        self.lock = threading.Lock()

    def record(self, phase: str, case, response, failure: Exception | None) -> None:
        with self.lock:
            self.requests[phase] += 1
            label = f"{case.method.upper()} {case.operation.path}"
            self.statuses[(label, response.status_code)] += 1
            if response.status_code >= 500:
                self.server_errors[phase] += 1
            if failure is not None:
                for name in _failure_names(failure):
                    self.breaks[f"{phase}: {label}: {name}"] += 1
                if len(self.samples) < 5:
                    self.samples.append(f"{label} -> {response.status_code}: {str(failure)[:400]}")


# Subs holding every separator and escape character, the public owner's name and the raw forms of
# other tenants' prefixes (what the second hostile round used, and more).
HOSTILE_SUBS = ["alice/models", "carol=2Fx", "carol/x", "auth0|victim", "auth0=7Cvictim", "public", "(public)", "Public",
                "a#b", "a|b", "/", "//", ".", "..", ".a", "=", "=41", "%2F", "a%7Cb", "+", "*", "?", "\\", "a b",
                "a\tb", "a\nb", "a\x00b", "é", "e\u0301", "日本", "🙂", ":", ";", ",", "&", "!", "$", "'", '"', "`",
                "~", "<a>", "[a]", "{a}", "@", "\u2028", "\ufeff", "base-debug", "datasets", "s3://x/y", "x" * 80]


def _raw(base_url: str, request: bytes, half_close: bool = False) -> int:
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(base_url)
    with socket.create_connection((url.hostname, url.port), timeout=60) as client:
        client.sendall(request)
        if half_close:
            client.shutdown(socket.SHUT_WR)
        answer = b"".join(iter(lambda: client.recv(65536), b""))
    return int(answer.split(b" ", 2)[1])


def _edge(base_url: str, data_bucket: str, tally: "Tally") -> list[str]:
    """The edge phase: (label, status) into the tally; the answers that were not the expected one."""
    import requests

    from local.server import MAX_BODY_BYTES
    from shared.tenancy import PUBLIC_OWNER, owner_of

    wrong: list[str] = []

    def expect(label: str, status: int, allowed: set[int]) -> None:
        with tally.lock:
            tally.requests["edge"] += 1
            tally.statuses[(f"edge {label}", status)] += 1
            if status >= 500:
                tally.server_errors["edge"] += 1
        if status not in allowed:
            wrong.append(f"{label}: {status}, expected {sorted(allowed)}")

    for sub in HOSTILE_SUBS:
        owner, headers = owner_of(sub), {"authorization": f"Bearer {_jwt(sub)}"}
        listed = requests.get(f"{base_url}/models", headers=headers, timeout=60)
        expect("GET /models", listed.status_code, {200})
        ids = [m["model_id"] for m in listed.json()["models"]]
        if len(ids) != len(set(ids)) or {"m-alice", "m-bob"} & set(ids):
            wrong.append(f"GET /models as {sub!r}: {ids}")
        if any(m["owner"] not in (PUBLIC_OWNER, owner) for m in listed.json()["models"]):
            wrong.append(f"GET /models as {sub!r}: another owner's model")
        expect("GET /datasets", requests.get(f"{base_url}/datasets", headers=headers, timeout=60).status_code, {200})
        own = requests.post(f"{base_url}/models", json={"name": "m", "uri": f"s3://{data_bucket}/{owner}/m/"},
                            headers=headers, timeout=60)
        expect("POST /models own prefix", own.status_code, {201})
        raw = requests.post(f"{base_url}/models", json={"name": "m", "uri": f"s3://{data_bucket}/{sub}/m/"},
                            headers=headers, timeout=60)
        expect("POST /models raw-sub prefix", raw.status_code, {201} if owner == sub else {422})
        job = {"type": "train", "model": "base-debug", "dataset": f"s3://{data_bucket}/{sub}/corpus.jsonl"}
        expect("POST /jobs unchecked s3 URI", requests.post(f"{base_url}/jobs", json=job, headers=headers,
                                                            timeout=60).status_code, {404, 422})
        contract = {"type": "contract", "dataset": "ds-aaaaaaaaaaaa",
                    "hyperparams": {"source_model_id": "base-debug", "num_layers_to_contract": 1}}
        expect("POST /jobs contract a base model", requests.post(f"{base_url}/jobs", json=contract, headers=headers,
                                                                 timeout=60).status_code, {404, 422})

    head = "POST /jobs HTTP/1.1\r\nHost: local\r\ncontent-type: application/json\r\n"
    framing = [
        ("Content-Length 10^12", f"{head}Content-Length: {10**12}\r\n\r\n".encode(), False, {413}),
        ("Content-Length over 10 MB", f"{head}Content-Length: {MAX_BODY_BYTES + 1}\r\n\r\n".encode(), False, {413}),
        ("two Content-Length", f"{head}Content-Length: 2\r\nContent-Length: 2\r\n\r\n{{}}".encode(), False, {400}),
        ("body shorter than Content-Length", f"{head}Content-Length: 100\r\n\r\n{{}}".encode(), True, {400}),
        ("Content-Length not a number", f"{head}Content-Length: 1e3\r\n\r\n".encode(), False, {400}),
        ("Transfer-Encoding chunked", f"{head}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n".encode(), False, {411}),
    ]
    for scheme in ("Basic YWxpY2U6cHc=", "Token abc", "Bearer", "Digest username=alice", "alice"):
        framing.append((f"Authorization {scheme.split()[0]}",
                        f"GET /jobs HTTP/1.1\r\nHost: local\r\nAuthorization: {scheme}\r\n\r\n".encode(), False, {401}))
    for label, request, half_close, allowed in framing:
        expect(label, _raw(base_url, request, half_close), allowed)
    return wrong


def _failure_names(failure: Exception) -> list[str]:
    inner = getattr(failure, "exceptions", None) or [failure]
    return [getattr(e, "title", None) or type(e).__name__ for e in inner]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=150, help="examples per operation and mode (stateless)")
    parser.add_argument("--scenarios", type=int, default=150, help="stateful scenarios")
    parser.add_argument("--steps", type=int, default=10, help="most steps per stateful scenario")
    args = parser.parse_args()

    import requests
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import (
        content_type_conformance,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )

    from local.server import make_server, start_in_process_aws

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    env = start_in_process_aws()
    _seed(env)
    httpd = make_server("127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    spec = _narrowed(requests.get(f"{base_url}/openapi.json", timeout=10).json(), env["DATA_BUCKET"])
    schema = schemathesis.openapi.from_dict(spec)
    tally = Tally()
    tokens = {t: _jwt(t) for t in TENANTS}

    def call(phase: str, case) -> None:
        case.headers = {**(case.headers or {}), "authorization": f"Bearer {tokens['alice']}"}
        response = case.call(base_url=base_url)
        try:
            case.validate_response(response, checks=checks)
        except Exception as failure:  # a finding: counted and sampled, the run goes on
            tally.record(phase, case, response, failure)
        else:
            tally.record(phase, case, response, None)
        return response

    started = time.monotonic()
    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:
        for mode in schemathesis.GenerationMode:
            @given(case=operation.as_strategy(mode))
            @settings(max_examples=args.examples, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            def fuzz(case):
                call("stateless", case)

            try:
                fuzz()
            except Unsatisfiable:  # an operation without inputs has nothing to make invalid
                pass
    stateless_s = time.monotonic() - started

    from schemathesis.generation.stateful.state_machine import StepOutput

    class Machine(schema.as_state_machine()):
        def step(self, input):  # the response feeds the links of the next steps
            return StepOutput(call("stateful", input.case), input.case)

    started = time.monotonic()
    Machine.run(settings=settings(max_examples=args.scenarios, stateful_step_count=args.steps, deadline=None,
                                  database=None, derandomize=True, suppress_health_check=list(HealthCheck)))
    stateful_s = time.monotonic() - started
    started = time.monotonic()
    wrong = _edge(base_url, env["DATA_BUCKET"], tally)
    edge_s = time.monotonic() - started
    httpd.shutdown()

    created = tally.statuses[("POST /jobs", 201)]
    print(f"operations: {len(operations)}")
    for phase, seconds in (("stateless", stateless_s), ("stateful", stateful_s), ("edge", edge_s)):
        print(f"{phase:9}  requests {tally.requests[phase]:6,}  5xx {tally.server_errors[phase]:3}  "
              f"spec breaks {sum(v for k, v in tally.breaks.items() if k.startswith(phase)):3}  ({seconds:.0f} s)")
    total = sum(tally.requests.values())
    print(f"total      requests {total:6,}  5xx {sum(tally.server_errors.values()):3}  "
          f"spec breaks {sum(tally.breaks.values()):3}")
    print(f"POST /jobs answered 201 (a job created) {created} times; statuses per operation:")
    for label in sorted({label for label, _ in tally.statuses}):
        row = ", ".join(f"{status}: {n}" for (lab, status), n in sorted(tally.statuses.items()) if lab == label)
        print(f"  {label:40} {row}")
    for name, count in tally.breaks.most_common():
        print(f"  break  {count:4}  {name}")
    for sample in tally.samples:
        print(f"  e.g. {sample}")
    print(f"edge answers not the expected one: {len(wrong)}")
    for line in wrong[:20]:
        print(f"  {line}")
    return 1 if tally.breaks or wrong or sum(tally.server_errors.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
