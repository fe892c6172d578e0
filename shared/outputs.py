"""Reading what the container writes to S3: progress.json and the metrics log while it runs (synced
from its checkpoint folder), metrics.json in the output archive once it has ended.
"""

from __future__ import annotations

import json
from typing import Any

from shared.store import missing_object

METRICS_MAX_POINTS = 1000  # training-loss points a job's metrics answer holds at most


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def progress_key(job_id: str) -> str:
    return f"jobs/{job_id}/checkpoints/progress.json"


def read_progress(s3: Any, bucket: str, job_id: str) -> dict[str, Any] | None:
    """progress.json of a job, or None when there is none to read: not written yet, or not a
    JSON object (a torn or foreign write is no progress, not an error)."""
    from botocore.exceptions import ClientError

    try:
        body = s3.get_object(Bucket=bucket, Key=progress_key(job_id))["Body"].read()
    except ClientError as exc:
        if missing_object(exc):
            return None
        raise
    try:
        progress = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return progress if isinstance(progress, dict) else None


def count_of(value: Any) -> int:
    """A token count from a file the container wrote: a non-negative int, else 0 (nothing proven)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def metrics_log_key(job_id: str) -> str:
    """The trainer's metrics log (training_image.train.METRICS_LOG), synced beside progress.json."""
    return f"jobs/{job_id}/checkpoints/metrics.jsonl"


def read_metrics_log(s3: Any, bucket: str, job_id: str, *, max_points: int = METRICS_MAX_POINTS) -> dict[str, Any]:
    """A job's curve: training loss per logged step (at most max_points, evenly thinned, the last
    step always kept) and every held-out evaluation. Empty lists before the trainer logs anything.

    A resumed trainer logs the steps after its checkpoint again: the last line of a (kind, step) wins.
    """
    try:
        body = s3.get_object(Bucket=bucket, Key=metrics_log_key(job_id))["Body"].read()
    except Exception as exc:
        if not missing_object(exc):
            raise
        body = b""
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    for line in body.decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
            key = (str(record["kind"]), int(record["step"]))
        except (ValueError, KeyError, TypeError):  # a line cut by a sync in mid-write
            continue
        latest[key] = record
    ordered = [latest[key] for key in sorted(latest, key=lambda k: k[1])]
    steps = [r for r in ordered if r["kind"] == "step"]
    evals = [r for r in ordered if r["kind"] == "eval"]
    stride = -(-len(steps) // max_points) if steps else 1
    thinned = steps[::stride]
    if steps and thinned[-1] is not steps[-1]:
        thinned.append(steps[-1])
    return {"job_id": job_id, "steps": thinned, "evals": evals, "logged_steps": len(steps)}


def read_metrics(s3: Any, model_artifacts_uri: str) -> dict[str, Any]:
    """metrics.json from the small output.tar.gz SageMaker writes beside model.tar.gz."""
    import io
    import tarfile

    bucket, key = split_s3(model_artifacts_uri)
    key = key.rsplit("/", 1)[0] + "/output.tar.gz"
    blob = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as archive:
        for member in archive.getmembers():
            if member.isfile() and member.name.rsplit("/", 1)[-1] == "metrics.json":
                return json.load(archive.extractfile(member))
    raise FileNotFoundError(f"no metrics.json in s3://{bucket}/{key}")
