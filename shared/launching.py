"""Launching a queued job: what the launcher checks before it starts the job's training job."""

from __future__ import annotations

from typing import Any

from shared.outputs import split_s3
from shared.store import missing_object


def dataset_replaced(s3: Any, job: dict[str, Any]) -> str | None:
    """Why the job's dataset is no longer the object its check admitted, or None when it still is
    (or the job trains on an S3 URI, which no check pinned). A job never trains on bytes nobody
    checked: the launcher refuses it instead."""
    pin = job.get("dataset_pin")
    if not pin:
        return None
    from botocore.exceptions import ClientError

    bucket, key = split_s3(job["dataset_uri"])
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if missing_object(exc):
            return f"dataset {job['dataset']!r} was deleted after its check"
        raise
    if head.get("ETag") != pin["etag"] or (pin.get("version_id") and head.get("VersionId") != pin["version_id"]):
        return (f"dataset {job['dataset']!r} was replaced after its check (a second upload); a job trains only "
                "on the data that was checked: register the dataset again and upload it once")
    return None
