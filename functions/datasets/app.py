"""S3 ObjectCreated on the data bucket: check an uploaded dataset and mark it ready or rejected
(or failed, naming the error, when the check itself broke).

A ready dataset is pinned to the object it was checked on (its ETag and version id): a later
upload to the same key never makes it ready on other bytes; it marks it replaced, and no job is
admitted on a replaced dataset. A job is launched only on the checked object.
"""

from __future__ import annotations

from functools import cache
from urllib.parse import unquote_plus

from aws_lambda_powertools import Logger, Tracer
from aws_lambda_powertools.utilities.data_classes import S3Event, event_source
from aws_lambda_powertools.utilities.typing import LambdaContext

from shared.datasets import check_dataset, parse_dataset_key
from shared.store import Datasets

logger = Logger()
tracer = Tracer()
CHUNK_BYTES = 1 << 20


@cache
def _clients():
    import boto3

    return boto3.client("s3"), Datasets()


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler
@event_source(data_class=S3Event)
def lambda_handler(event: S3Event, context: LambdaContext) -> dict:
    s3, store = _clients()
    checked = []
    for record in event.records:
        key = unquote_plus(record.s3.get_object.key)
        parsed = parse_dataset_key(key)
        if parsed is None:
            continue  # tenant data that is not an uploaded dataset
        owner, dataset_id, fmt = parsed
        # The version this notification is about, so the verdict is that of the bytes it names.
        version = record.s3.get_object.version_id
        if _check(s3, store, record.s3.bucket.name, key, version, owner, dataset_id, fmt):
            checked.append(dataset_id)
    return {"checked": checked}


def _check(s3, store: Datasets, bucket: str, key: str, version: str | None, owner: str, dataset_id: str,
           fmt: str) -> bool:
    """Check one uploaded object and record the verdict. Every way it ends is recorded: ready,
    rejected with the reason, or failed naming the error (a check that broke is never left pending,
    to be redelivered forever). Only a failure to write the verdict itself is raised."""
    etag = version_id = None
    try:
        read = s3.get_object(Bucket=bucket, Key=key, **({"VersionId": version} if version else {}))
        etag, version_id = read.get("ETag"), read.get("VersionId")
        result = check_dataset(read["Body"].iter_chunks(CHUNK_BYTES), fmt)
        # A rejection may stop reading early: the dataset's size is the object's, not how far the check read.
        size = read.get("ContentLength", result.bytes)
        verdict = {"ok": result.ok, "bytes_read": size, "tokens": result.tokens, "reason": result.reason,
                   "chat": result.chat}
    except Exception as error:  # whatever broke, the dataset must not stay pending
        logger.exception("dataset check failed", dataset_id=dataset_id, key=key)
        verdict = {"ok": False, "bytes_read": 0, "tokens": 0, "status": "failed",
                   "reason": f"the check could not finish: {type(error).__name__}: {error}"[:1000]}
    if store.record_check(dataset_id, owner, etag=etag, version_id=version_id, **verdict):
        logger.info("dataset checked", dataset_id=dataset_id, **{k: verdict.get(k) for k in ("ok", "status", "reason")})
        return True
    if etag and store.mark_replaced(dataset_id, owner, etag=etag, version_id=version_id):
        logger.warning("ready dataset replaced by a later upload: no job is admitted on it", dataset_id=dataset_id)
        return True
    logger.warning("upload ignored: no such dataset of this tenant, or the very object a ready one was checked on",
                   key=key)
    return False
