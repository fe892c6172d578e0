"""Schemathesis over every operation of the served spec, stateless and stateful, with the figures.

    .venv/bin/python bench/fuzz_api.py [--examples 150] [--scenarios 150] [--steps 10]

The local HTTP server on loopback (moto in-process, tables and buckets from template.yaml), two
tenants with a ready dataset and a trained model each. The spec is fetched from the server and,
for this run only, narrowed so valid requests name real ids (a base model, the tenant's dataset
and model) and linked (POST /jobs -> GET /jobs/{job_id} and its cancel, POST /datasets -> GET
/datasets/{dataset_id}), so POST /jobs gets past its 404s and the stateful phase follows real
jobs. Every response is checked: no 5xx, and status code, content type and body keep to the spec.
Prints requests, 5xx and spec breaks per phase; exits non-zero on any 5xx or spec break.
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

    from shared.shapes import SIZES, grown_config
    from shared.store import Catalog

    session = boto3.session.Session()
    grown = grown_config(SIZES["debug"])
    for owner in TENANTS:
        ds = f"ds-{owner[0] * 12}"
        session.client("dynamodb").put_item(TableName=env["DATASETS_TABLE"], Item={
            "dataset_id": {"S": ds}, "owner": {"S": owner}, "status": {"S": "ready"}, "name": {"S": "d"},
            "s3_uri": {"S": f"s3://{env['DATA_BUCKET']}/{owner}/datasets/{ds}/data.jsonl"},
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
    datasets = [f"ds-{t[0] * 12}" for t in TENANTS] + [f"s3://{data_bucket}/alice/corpus.jsonl"]
    schemas["TrainJobRequest"]["properties"]["model"] = {"type": "string", "enum": ["base-debug", "base-tiny", "m-alice"]}
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
    httpd.shutdown()

    created = tally.statuses[("POST /jobs", 201)]
    print(f"operations: {len(operations)}")
    for phase, seconds in (("stateless", stateless_s), ("stateful", stateful_s)):
        print(f"{phase:9}  requests {tally.requests[phase]:6,}  5xx {tally.server_errors[phase]:3}  "
              f"spec breaks {sum(v for k, v in tally.breaks.items() if k.startswith(phase)):3}  ({seconds:.0f} s)")
    total = sum(tally.requests.values())
    print(f"total      requests {total:6,}  5xx {sum(tally.server_errors.values()):3}  "
          f"spec breaks {sum(tally.breaks.values()):3}")
    print(f"POST /jobs answered 201 (a job created) {created} times; statuses per operation:")
    for label in sorted({label for label, _ in tally.statuses}):
        row = ", ".join(f"{status}: {n}" for (lab, status), n in sorted(tally.statuses.items()) if lab == label)
        print(f"  {label:32} {row}")
    for name, count in tally.breaks.most_common():
        print(f"  break  {count:4}  {name}")
    for sample in tally.samples:
        print(f"  e.g. {sample}")
    return 1 if tally.breaks or sum(tally.server_errors.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
