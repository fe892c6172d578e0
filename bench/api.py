"""API-side benchmark: what a cold start of each function waits on, and warm POST /jobs latency on moto.

    .venv/bin/python bench/api.py [--runs 5] [--requests 300]

Cold import: `import functions.<name>.app` in a fresh interpreter, tracing on (as in Lambda:
AWS_LAMBDA_FUNCTION_NAME set, so Powertools' Tracer patches botocore), median of --runs, beside
the bare `import boto3, aws_lambda_powertools` measured the same way in the same run (the floor
any function pays). This is what a function without SnapStart waits on, and what SnapStart moves
into the snapshot.

Restored snapshot: what a SnapStart function's first request waits on besides Lambda's own
restore: the after-restore hook (shared.snapstart.restored: reseed, forget the clients) and
building the clients that request uses anew. Measured in a fresh interpreter that imported the
function and ran its before-snapshot hook, as the snapshot holds it; beside the same with the
service models parsed again (no shared botocore loader), the reference it improves on.
Target: the restored wait <= 1.3x the floor.

Warm latency: POST /jobs through the API's lambda_handler in-process, AWS served by moto
in-process (tables, queue and buckets created from template.yaml).
Targets on the 2-core development machine: import <= 0.5 s per function, POST /jobs p50 <= 20 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

REFERENCE = "import boto3, aws_lambda_powertools"
# What a Tracer costs at import: the X-Ray SDK's recorder builds its sampling client (botocore) then.
TRACER = "from aws_lambda_powertools import Tracer; Tracer()"
FUNCTIONS = {
    "api": "import functions.api.app",
    "launcher": "import functions.launcher.app",
    "events": "import functions.events.app",
}
IMPORT_TARGET_S = 0.5
P50_TARGET_MS = 20.0
RESTORE_TARGET_RATIO = 1.3
# A restore, in a fresh interpreter: the function imported and its before-snapshot hook run first.
RESTORE = """
import time
from shared import snapstart
import functions.{name}.app
snapstart.prepare()
if {reparse}:
    snapstart._LOADER = None  # as if each restore parsed the service models again
t = time.perf_counter()
snapstart.restored()
snapstart.prepare()
print(time.perf_counter() - t)
"""


def _env() -> dict[str, str]:
    """A Lambda-like environment: tracing on, credentials in the environment."""
    return {**os.environ, "AWS_DEFAULT_REGION": "us-east-1", "POWERTOOLS_SERVICE_NAME": "fusion",
            "AWS_LAMBDA_FUNCTION_NAME": "fusion-bench", "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}


def cold_import_seconds(statements: dict[str, str], runs: int) -> dict[str, float]:
    """Median import time of each statement, each run in a fresh interpreter.

    The statements take turns within each round, so a busy machine slows them alike and the
    ratios against the reference stay meaningful.
    """
    env = _env()
    times: dict[str, list[float]] = {name: [] for name in statements}
    for _ in range(runs):
        for name, statement in statements.items():
            code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
            out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                                 check=True)
            times[name].append(float(out.stdout.strip().splitlines()[-1]))
    return {name: statistics.median(values) for name, values in times.items()}


def restore_seconds(runs: int) -> dict[str, tuple[float, float]]:
    """Median restored wait of each function: (with the shared service models, parsing them again)."""
    env = _env()
    times: dict[tuple[str, bool], list[float]] = {(n, r): [] for n in FUNCTIONS for r in (False, True)}
    for _ in range(runs):
        for name, reparse in times:
            out = subprocess.run([sys.executable, "-c", RESTORE.format(name=name, reparse=reparse)], cwd=ROOT, env=env,
                                 capture_output=True, text=True, check=True)
            times[(name, reparse)].append(float(out.stdout.strip().splitlines()[-1]))
    return {n: (statistics.median(times[(n, False)]), statistics.median(times[(n, True)])) for n in FUNCTIONS}


def post_jobs_latency_ms(requests: int, warmup: int = 20) -> list[float]:
    os.environ.update(AWS_DEFAULT_REGION="us-east-1", AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      POWERTOOLS_SERVICE_NAME="fusion", POWERTOOLS_LOG_LEVEL="WARNING")
    from local.resources import function_environment, load_template

    # The metrics namespace before the functions are imported: their Metrics take it then.
    os.environ["POWERTOOLS_METRICS_NAMESPACE"] = function_environment(load_template())["POWERTOOLS_METRICS_NAMESPACE"]
    import boto3
    from moto import mock_aws

    from functions.api.app import lambda_handler
    from local.resources import create_resources
    from local.server import api_event
    from local.stack import LambdaContext
    from shared.store import Catalog, seed_base_models

    with mock_aws():
        session = boto3.session.Session(region_name="us-east-1")
        env = create_resources(session)
        os.environ.update(env)
        os.environ["FUSION_DEFAULT_BUDGET_USD"] = "1000000"  # hundreds of jobs: measure latency, not the budget
        catalog = Catalog(session=session)
        seed_base_models(catalog, artifacts_bucket=env["ARTIFACTS_BUCKET"])
        # The base model's weights as an operator publishes them: a job starts only from available weights.
        bucket, key = catalog.get("base-small", "bench")["artifact_uri"][len("s3://"):].split("/", 1)
        session.client("s3").put_object(Bucket=bucket, Key=key, Body=b"archive")
        session.client("s3").put_object(Bucket=env["DATA_BUCKET"], Key="bench/datasets/ds-benchbenchbe/data.jsonl",
                                        Body=b'{"text": "bench"}\n')
        session.client("dynamodb").put_item(TableName=env["DATASETS_TABLE"], Item={
            "dataset_id": {"S": "ds-benchbenchbe"}, "owner": {"S": "bench"}, "status": {"S": "ready"},
            "s3_uri": {"S": f"s3://{env['DATA_BUCKET']}/bench/datasets/ds-benchbenchbe/data.jsonl"},
            "created_at": {"S": "2026-01-01T00:00:00Z"}})
        context = LambdaContext("fusion-api")
        sink = open(os.devnull, "w")
        body = json.dumps({"type": "train", "model": "base-small", "dataset": "ds-benchbenchbe",
                           "hyperparams": {"turns": 2}})
        sqs = session.client("sqs")
        samples = []
        for i in range(warmup + requests):
            event = api_event("POST", "/jobs", headers={"content-type": "application/json"}, body=body,
                              claims={"sub": "bench"})
            start = time.perf_counter()
            with contextlib.redirect_stdout(sink):  # the metric records each request prints, as Lambda's stdout
                result = lambda_handler(event, context)
            elapsed = (time.perf_counter() - start) * 1000
            assert result["statusCode"] == 201, result
            if i >= warmup:
                samples.append(elapsed)
            # The launcher drains the queue in AWS; left to grow, moto's SendMessage slows with its length.
            for message in sqs.receive_message(QueueUrl=env["LAUNCH_QUEUE_URL"], MaxNumberOfMessages=10).get(
                "Messages", []
            ):
                sqs.delete_message(QueueUrl=env["LAUNCH_QUEUE_URL"], ReceiptHandle=message["ReceiptHandle"])
    return samples


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()

    medians = cold_import_seconds({"reference": REFERENCE, "tracer": TRACER, **FUNCTIONS}, args.runs)
    reference = medians.pop("reference")
    tracer = medians.pop("tracer")
    load = os.getloadavg()[0]
    print(f"cold import, median of {args.runs} fresh processes (load average {load:.1f} on {os.cpu_count()} cores)")
    print(f"  {'reference':<10} {reference:6.3f} s   ({REFERENCE})")
    print(f"  {'tracer':<10} {tracer:6.3f} s   x{tracer / reference:.2f} of reference   ({TRACER})")
    for name, seconds in medians.items():
        verdict = "ok" if seconds <= IMPORT_TARGET_S else "OVER"
        print(f"  {name:<10} {seconds:6.3f} s   x{seconds / reference:.2f} of reference   "
              f"target <= {IMPORT_TARGET_S} s: {verdict}")

    restores = restore_seconds(args.runs)
    print(f"restored snapshot (SnapStart): the after-restore hook and the first request's clients, median of "
          f"{args.runs} fresh processes")
    for name, (shared_models, reparsed) in restores.items():
        verdict = "ok" if shared_models <= RESTORE_TARGET_RATIO * reference else "OVER"
        print(f"  {name:<10} {shared_models * 1000:6.1f} ms   x{shared_models / reference:.2f} of reference   "
              f"target <= x{RESTORE_TARGET_RATIO}: {verdict}   (models parsed again: {reparsed * 1000:.1f} ms, "
              f"x{reparsed / shared_models:.1f} of it)")

    samples = post_jobs_latency_ms(args.requests)
    p50, p99 = percentile(samples, 50), percentile(samples, 99)
    verdict = "ok" if p50 <= P50_TARGET_MS else "OVER"
    print(f"warm POST /jobs in-process on moto, {len(samples)} requests")
    print(f"  p50 {p50:6.2f} ms   p99 {p99:6.2f} ms   mean {statistics.fmean(samples):6.2f} ms   "
          f"p50 target <= {P50_TARGET_MS} ms: {verdict} (x{p50 / P50_TARGET_MS:.2f} of target)")


if __name__ == "__main__":
    main()
