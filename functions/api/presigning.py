"""The S3 client that signs the URLs the API hands out (dataset uploads, model downloads).

Signed for the bucket's regional virtual-hosted endpoint (https://<bucket>.s3.<region>.amazonaws.com):
a URL for the global endpoint (https://<bucket>.s3.amazonaws.com) reaches a bucket outside
us-east-1 by a 307 redirect for up to a day after the bucket is made, which breaks both the
signature and the browser's CORS check. An endpoint configured for the process (AWS_ENDPOINT_URL,
as the local stack sets) is used as it is.
"""

from __future__ import annotations

from typing import Any

PRESIGNING_S3 = {"addressing_style": "virtual", "us_east_1_regional_endpoint": "regional"}


def presigning_s3(session: Any) -> Any:
    from botocore.config import Config

    return session.client("s3", config=Config(signature_version="s3v4", s3=dict(PRESIGNING_S3)))
