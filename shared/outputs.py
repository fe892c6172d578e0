"""Reading what the container writes to S3: progress.json and the metrics log while it runs (synced
from its checkpoint folder), metrics.json in the output archive once it has ended.

Where: a job's checkpoint folder is synced to checkpoints/<job id>/ in the artifacts bucket, which a
lifecycle rule (template.yaml) expires CHECKPOINT_RETENTION_DAYS after each object's last write:
a job's last checkpoint goes that long after the job ends. Its metrics log is kept: when the job
ends, it is copied beside the job's outputs (jobs/<job id>/metrics.jsonl), which never expire.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from shared.contracts import LOG_RECORD, METRICS, Metrics, Progress, problems
from shared.store import missing_object

METRICS_MAX_POINTS = 1000  # training-loss points a job's metrics answer holds at most


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


CHECKPOINTS_PREFIX = "checkpoints/"
CHECKPOINT_RETENTION_DAYS = 7


def checkpoint_prefix(job_id: str) -> str:
    """The S3 prefix the job's checkpoint folder (/opt/ml/checkpoints) is synced to."""
    return f"{CHECKPOINTS_PREFIX}{job_id}/"


def progress_key(job_id: str) -> str:
    return checkpoint_prefix(job_id) + "progress.json"


def read_progress(s3: Any, bucket: str, job_id: str) -> Progress | None:
    """progress.json of a job, or None when there is none to read: not written yet, or not the
    trainer's Progress (a torn or foreign write is no progress, not an error)."""
    from botocore.exceptions import ClientError

    try:
        body = s3.get_object(Bucket=bucket, Key=progress_key(job_id))["Body"].read()
    except ClientError as exc:
        if missing_object(exc):
            return None
        raise
    try:
        return Progress.model_validate_json(body)
    except (ValidationError, RecursionError):
        return None


def metrics_log_key(job_id: str) -> str:
    """The trainer's metrics log (training_image.train.METRICS_LOG), synced beside progress.json."""
    return checkpoint_prefix(job_id) + "metrics.jsonl"


def kept_metrics_log_key(job_id: str) -> str:
    """The metrics log of an ended job, beside its outputs (keep_metrics_log copies it there)."""
    return f"jobs/{job_id}/metrics.jsonl"


def keep_metrics_log(s3: Any, bucket: str, job_id: str) -> bool:
    """Copy an ended job's metrics log out of its checkpoint folder, which expires; False when it
    wrote none. Copying again copies the same log."""
    try:
        s3.copy_object(Bucket=bucket, Key=kept_metrics_log_key(job_id),
                       CopySource={"Bucket": bucket, "Key": metrics_log_key(job_id)})
    except Exception as exc:
        if not missing_object(exc):
            raise
        return False
    return True


def read_metrics_log(s3: Any, bucket: str, job_id: str, *, ended: bool = False,
                     max_points: int = METRICS_MAX_POINTS) -> dict[str, Any]:
    """A job's curve: training loss per logged step (at most max_points, evenly thinned, the last
    step always kept) and every held-out evaluation. Empty lists before the trainer logs anything.
    An ended job's is read from where it is kept, else (not copied yet) from its checkpoint folder.

    A resumed trainer logs the steps after its checkpoint again: the last line of a (kind, step) wins.
    """
    body = b""
    for key in (kept_metrics_log_key(job_id), metrics_log_key(job_id)) if ended else (metrics_log_key(job_id),):
        try:
            body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:
            if not missing_object(exc):
                raise
            continue
        break
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    for line in body.decode("utf-8", errors="replace").splitlines():
        try:
            record = LOG_RECORD.validate_json(line)
        except (ValidationError, RecursionError):  # a line cut by a sync in mid-write
            continue
        latest[(record.kind, record.step)] = record.model_dump(mode="json")
    ordered = [latest[key] for key in sorted(latest, key=lambda k: k[1])]
    steps = [r for r in ordered if r["kind"] == "step"]
    evals = [r for r in ordered if r["kind"] == "eval"]
    stride = -(-len(steps) // max_points) if steps else 1
    thinned = steps[::stride]
    if steps and thinned[-1] is not steps[-1]:
        thinned.append(steps[-1])
    return {"job_id": job_id, "steps": thinned, "evals": evals, "logged_steps": len(steps)}


def read_metrics(s3: Any, model_artifacts_uri: str) -> Metrics:
    """metrics.json from the small output.tar.gz SageMaker writes beside model.tar.gz; a ValueError
    naming what is wrong when it does not hold to the container's Metrics."""
    import io
    import tarfile

    bucket, key = split_s3(model_artifacts_uri)
    key = key.rsplit("/", 1)[0] + "/output.tar.gz"
    blob = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as archive:
        found = [m for m in archive.getmembers() if m.isfile() and m.name.rsplit("/", 1)[-1] == "metrics.json"]
        if not found:
            raise FileNotFoundError(f"no metrics.json in s3://{bucket}/{key}")
        document = archive.extractfile(found[0]).read()
    try:
        return METRICS.validate_json(document)
    except ValidationError as exc:
        raise ValueError(f"metrics.json does not hold to the container's metrics: {problems(exc)}") from None
