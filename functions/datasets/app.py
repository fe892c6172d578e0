"""S3 ObjectCreated on the data bucket: check an uploaded dataset and mark it ready or rejected.

A ready dataset is pinned to the object it was checked on (its ETag and version id): a later
upload to the same key never changes its verdict, and a job is launched only on that object.
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
        read = s3.get_object(Bucket=record.s3.bucket.name, Key=key, **({"VersionId": version} if version else {}))
        result = check_dataset(read["Body"].iter_chunks(CHUNK_BYTES), fmt)
        if store.record_check(dataset_id, owner, ok=result.ok, bytes_read=result.bytes, tokens=result.tokens,
                              reason=result.reason, etag=read.get("ETag"), version_id=read.get("VersionId"),
                              chat=result.chat):
            logger.info("dataset checked", dataset_id=dataset_id, ok=result.ok, reason=result.reason, tokens=result.tokens)
            checked.append(dataset_id)
        else:
            logger.warning("upload ignored: no such dataset of this tenant, or one already ready (pinned)", key=key)
    return {"checked": checked}
