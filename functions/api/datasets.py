"""Dataset routes: register an upload, list and show the caller's datasets."""

from __future__ import annotations

import os
from functools import cache
from typing import Annotated

from aws_lambda_powertools.event_handler import Response, content_types
from aws_lambda_powertools.event_handler.api_gateway import Router
from aws_lambda_powertools.event_handler.openapi.params import Path

from functions.api import context
from shared.datasets import UPLOAD_URL_SECONDS, CreateDatasetRequest, DatasetNotFound, DatasetStore, dataset_key
from shared.errors import not_found

router = Router()


@cache
def _store() -> DatasetStore:
    import boto3

    table = boto3.resource("dynamodb").Table(os.environ["DATASETS_TABLE"])
    return DatasetStore(table, os.environ["DATA_BUCKET"])


@cache
def _s3():
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(signature_version="s3v4"))


def _tenant() -> str:
    return context.tenant(router)


@router.post("/datasets", summary="Register a dataset and get a presigned URL to upload it to",
             responses=context.responses({201: "The registered dataset and its upload URL"}, 415))
def create_dataset(request: CreateDatasetRequest):
    tenant = _tenant()
    dataset = _store().register(tenant, request)
    upload_url = _s3().generate_presigned_url(
        "put_object",
        Params={"Bucket": _store().bucket, "Key": dataset_key(tenant, dataset.dataset_id, request.format)},
        ExpiresIn=UPLOAD_URL_SECONDS,
    )
    body = {**dataset.model_dump(mode="json"), "upload_url": upload_url}
    return Response(status_code=201, content_type=content_types.APPLICATION_JSON, body=body)


@router.get("/datasets", summary="The caller's datasets, newest first",
            responses=context.responses({200: "The caller's datasets"}))
def list_datasets() -> dict:
    return {"datasets": [d.model_dump(mode="json") for d in _store().list(_tenant())]}


@router.get("/datasets/<dataset_id>", summary="One of the caller's datasets",
            responses=context.responses({200: "The dataset"}))
def get_dataset(dataset_id: Annotated[str, Path(max_length=64)]):
    try:
        return _store().get(_tenant(), dataset_id)
    except DatasetNotFound:
        raise not_found("dataset", "dataset_id", dataset_id) from None
