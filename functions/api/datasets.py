"""Dataset routes: register an upload, list, show and delete the caller's datasets."""

from __future__ import annotations

from functools import cache
from typing import Annotated

from aws_lambda_powertools.event_handler import Response, content_types
from aws_lambda_powertools.event_handler.api_gateway import Router
from aws_lambda_powertools.event_handler.openapi.params import Path

from functions.api import context
from functions.api.presigning import presigning_s3
from shared.datasets import UPLOAD_URL_SECONDS, CreateDatasetRequest, register
from shared.errors import not_found
from shared.outputs import split_s3
from shared.responses import Dataset, DatasetList, RegisteredDataset

router = Router()


@cache
def _s3():
    return presigning_s3(context.session())


def _tenant() -> str:
    return context.tenant(router)


@router.post("/datasets", summary="Register a dataset and get a presigned URL to upload it to",
             responses=context.responses({201: ("The registered dataset and its upload URL", RegisteredDataset)}, 415))
def create_dataset(request: CreateDatasetRequest) -> Response[RegisteredDataset]:
    dataset = register(context.datasets(), _tenant(), request, context.env("DATA_BUCKET"))
    bucket, key = split_s3(dataset["s3_uri"])
    upload_url = _s3().generate_presigned_url("put_object", Params={"Bucket": bucket, "Key": key},
                                              ExpiresIn=UPLOAD_URL_SECONDS)
    return Response(status_code=201, content_type=content_types.APPLICATION_JSON,
                    body={**dataset, "upload_url": upload_url})


@router.get("/datasets", summary="The caller's datasets, newest first",
            responses=context.responses({200: ("The caller's datasets", DatasetList)}))
def list_datasets() -> DatasetList:
    return DatasetList(datasets=context.datasets().list(_tenant()))


@router.get("/datasets/<dataset_id>", summary="One of the caller's datasets",
            responses=context.responses({200: ("The dataset", Dataset)}))
def get_dataset(dataset_id: Annotated[str, Path(max_length=64)]) -> Dataset:
    dataset = context.datasets().get(dataset_id, _tenant())
    if dataset is None:
        raise not_found("dataset", "dataset_id", dataset_id)
    return dataset


@router.delete("/datasets/<dataset_id>", summary="Delete one of your datasets",
               description="Deletes the dataset's data and takes it out of your list. Its record stays, as deleted, "
                           "so that models trained on it still name it; jobs can no longer use it.",
               responses=context.responses({200: ("The dataset, now deleted", Dataset)}))
def delete_dataset(dataset_id: Annotated[str, Path(max_length=64)]) -> Dataset:
    dataset = context.datasets().get(dataset_id, _tenant())
    if dataset is None:
        raise not_found("dataset", "dataset_id", dataset_id)
    if dataset["status"] != "deleted":
        context.datasets().delete(dataset_id, _tenant())
        bucket, key = split_s3(dataset["s3_uri"])
        _s3().delete_object(Bucket=bucket, Key=key)
    return context.datasets().get(dataset_id, _tenant())
