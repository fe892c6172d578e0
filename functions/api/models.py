"""Model routes: the caller's catalog (their models and the public base models)."""


from typing import Annotated, Any

from aws_lambda_powertools.event_handler import Response, content_types
from aws_lambda_powertools.event_handler.api_gateway import Router
from aws_lambda_powertools.event_handler.openapi.params import Path
from pydantic import BaseModel, ConfigDict, Field

from functions.api import context
from functions.api.presigning import presigning_s3
from shared.errors import JobError, invalid, not_found
from shared.hf import EXPORT_DIR
from shared.hf_check import folder_model
from shared.lifecycle import END_STATUSES
from shared.outputs import split_s3
from shared.responses import CatalogModel, Download, ModelList
from shared.store import available, not_available
from shared.tenancy import data_uri_prefix, owns_uri

DOWNLOAD_URL_SECONDS = 3600

router = Router()


@router.get("/models", summary="List models", description="Public base models and the caller's own models.",
            responses=context.responses({200: ("The models", ModelList)}))
def list_models() -> ModelList:
    return {"models": [_shown(model) for model in context.catalog().list(context.tenant(router))]}


def _shown(model: dict[str, Any]) -> dict[str, Any]:
    return {**model, "available": available(model, context.objects())}


class RegisterModelRequest(BaseModel):
    """A Hugging Face folder (config.json, safetensors shards, tokenizer.json) under the caller's data prefix."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=128)]
    uri: Annotated[str, Field(min_length=6, max_length=1024, description=(
        "s3://<data bucket>/<owner>/<folder>/, where <owner> is your owner value (your sub, encoded): the "
        "first segment of your datasets' s3_uri"))]


@router.post("/models", summary="Register your own base model",
             description="Checks the folder's config.json and safetensors headers (nothing is downloaded) and "
                         "registers it as ready, with its family, parameters, depth and context, or as rejected "
                         "with the reason. A ready model is trained like any base model.",
             responses=context.responses({201: ("The registered model, ready or rejected", CatalogModel)}, 415))
def register_model(request: RegisterModelRequest) -> Response[CatalogModel]:
    owner = context.tenant(router)
    if not owns_uri(request.uri, context.env("DATA_BUCKET"), owner):
        raise invalid("uri", f"a model folder must lie under {data_uri_prefix(context.env('DATA_BUCKET'), owner)}")
    model = folder_model(request.uri, request.name, owner, _s3())
    context.catalog().register(model)
    return Response(status_code=201, content_type=content_types.APPLICATION_JSON, body=model)


@router.get("/models/<model_id>", summary="Show a model",
            description="Size, depth, perplexity, parent, producing job, artifact and cost of one model.",
            responses=context.responses({200: ("The model", CatalogModel)}))
def get_model(model_id: Annotated[str, Path(max_length=128)]) -> CatalogModel:
    model = context.catalog().get(model_id, context.tenant(router))
    if model is None:
        raise not_found("model", "model_id", model_id)
    return _shown(model)


@router.get("/models/<model_id>/download", summary="Download a model",
            description=f"A presigned URL (valid {DOWNLOAD_URL_SECONDS} s) of the model's archive, model.tar.gz: the "
                        f"compact model directory at its root, the transformers folder under {EXPORT_DIR}/.",
            responses=context.responses({200: ("The download URL", Download)}))
def download_model(model_id: Annotated[str, Path(max_length=128)]) -> Download:
    model = context.catalog().get(model_id, context.tenant(router))
    if model is None or not model.get("artifact_uri"):
        raise not_found("model", "model_id", model_id)
    if model.get("kind") == "imported":
        raise invalid("model_id", f"{model_id} is your own folder, at {model['artifact_uri']}; download its trained models")
    if model["artifact_uri"].endswith("/"):  # a published Hugging Face folder: no archive to sign
        raise invalid("model_id", f"{model_id} is a published Hugging Face folder, not an archive; download the "
                                  "models trained from it")
    if not available(model, context.objects()):
        raise invalid("model_id", not_available(model_id))
    bucket, key = split_s3(model["artifact_uri"])
    url = _s3().generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=DOWNLOAD_URL_SECONDS)
    return {"model_id": model_id, "url": url, "expires_in": DOWNLOAD_URL_SECONDS, "export_dir": EXPORT_DIR}


@router.delete("/models/<model_id>", summary="Delete one of your models",
               description="Removes the model from your catalog and deletes its archive. Its record stays, as "
                           "deleted, so that models made from it still name their parent. A model a job still "
                           "reads is refused (409); base models cannot be deleted.",
               responses=context.responses({200: ("The model, now deleted", CatalogModel)}, 409))
def delete_model(model_id: Annotated[str, Path(max_length=128)]) -> CatalogModel:
    tenant = context.tenant(router)
    model = context.catalog().get(model_id, tenant)
    if model is None:
        raise not_found("model", "model_id", model_id)
    if model["owner"] != tenant:
        raise invalid("model_id", f"{model_id} is a public base model; only your own models can be deleted")
    if model["status"] == "deleted":
        return model
    for job in context.jobs().list(tenant):
        if job["status"] not in END_STATUSES and model_id in (job.get("model"), job.get("settings", {}).get("source_model_id")):
            raise JobError(409, "in_use", f"job {job['job_id']} ({job['status']}) reads {model_id}: cancel it or "
                                          "let it end first", [{"field": "model_id", "message": "in use by a job"}])
    context.catalog().delete(model_id, tenant)
    if model.get("kind") != "imported" and model.get("artifact_uri"):  # a registered folder is the tenant's own data
        bucket, key = split_s3(model["artifact_uri"])
        _s3().delete_object(Bucket=bucket, Key=key)
    return context.catalog().get(model_id, tenant)


def _s3() -> Any:
    return presigning_s3(context.session())
