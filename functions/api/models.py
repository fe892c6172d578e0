"""Model routes: the caller's catalog (their models and the public base models)."""


import json
import time
from typing import Annotated, Any

from aws_lambda_powertools.event_handler import Response, content_types
from aws_lambda_powertools.event_handler.api_gateway import Router
from aws_lambda_powertools.event_handler.openapi.params import Path
from pydantic import BaseModel, ConfigDict, Field, model_validator

from functions.api import context
from functions.api.presigning import presigning_s3
from shared.errors import JobError, invalid, not_found
from shared.hf import EXPORT_DIR, export_manifest, export_prefix
from shared.hf_check import MAX_UPLOAD_BYTES, MAX_UPLOAD_FILES, UPLOAD_NAME, UPLOAD_URL_SECONDS, folder_model, new_upload_folder
from shared.lifecycle import END_STATUSES
from shared.outputs import is_archive, split_s3
from shared.responses import CatalogModel, Download, Generation, Message, ModelList, ModelUpload
from shared import serving
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


class UploadFile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: Annotated[str, Field(pattern=UPLOAD_NAME.pattern, description="The file's path in the folder.")]
    bytes: Annotated[int, Field(ge=0, le=MAX_UPLOAD_BYTES, description="Its size (one PUT carries at most 5 GiB).")]


class ModelUploadRequest(BaseModel):
    """The files of a Hugging Face folder on the caller's machine, to upload for `POST /models`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    files: Annotated[list[UploadFile], Field(min_length=1, max_length=MAX_UPLOAD_FILES)]


@router.post("/models/uploads", summary="Get upload URLs for a model folder of your own",
             description="A fresh folder under your data prefix and a presigned PUT for each file; once they are "
                         "uploaded, register the folder with POST /models (its uri).",
             responses=context.responses({201: ("The folder and the upload URLs", ModelUpload)}, 415))
def upload_model(request: ModelUploadRequest) -> Response[ModelUpload]:
    names = [f.name for f in request.files]
    if len(set(names)) != len(names):
        raise invalid("files", "a file is named twice")
    uri = new_upload_folder(context.env("DATA_BUCKET"), context.tenant(router))
    bucket, prefix = split_s3(uri)
    urls = [{"name": name, "url": _s3().generate_presigned_url("put_object", Params={"Bucket": bucket, "Key": prefix + name},
                                                               ExpiresIn=UPLOAD_URL_SECONDS)} for name in names]
    return Response(status_code=201, content_type=content_types.APPLICATION_JSON,
                    body={"uri": uri, "files": urls, "expires_in": UPLOAD_URL_SECONDS})


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
            description=f"Presigned URLs (valid {DOWNLOAD_URL_SECONDS} s) of the model folder's files, each with its "
                        f"path in the folder (`files`): the compact model directory at its root, the transformers "
                        f"folder under {EXPORT_DIR}/. A published base model, or a model made before outputs were "
                        "uploaded uncompressed, is one archive, model.tar.gz, laid out the same (`url`).",
            responses=context.responses({200: ("The download URLs", Download)}))
def download_model(model_id: Annotated[str, Path(max_length=128)]) -> Download:
    model = context.catalog().get(model_id, context.tenant(router))
    if model is None or not model.get("artifact_uri"):
        raise not_found("model", "model_id", model_id)
    if model.get("kind") == "imported":
        raise invalid("model_id", f"{model_id} is your own folder, at {model['artifact_uri']}; download its trained models")
    if not is_archive(model["artifact_uri"]) and model.get("kind") == "base":  # no job's output: nothing to sign
        raise invalid("model_id", f"{model_id} is a published Hugging Face folder, not a model a job made; download "
                                  "the models trained from it")
    if not available(model, context.objects()):
        raise invalid("model_id", not_available(model_id))
    bucket, key = split_s3(model["artifact_uri"])
    s3 = _s3()
    if is_archive(key):
        url = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=DOWNLOAD_URL_SECONDS)
        return {"model_id": model_id, "url": url, "expires_in": DOWNLOAD_URL_SECONDS, "export_dir": EXPORT_DIR}
    files = [{"path": item["Key"][len(key):], "size": item["Size"],
              "url": s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": item["Key"]},
                                               ExpiresIn=DOWNLOAD_URL_SECONDS)}
             for item in _listed(bucket, key) if not item["Key"].endswith("/")]
    if not files:
        raise invalid("model_id", f"{model_id} has no files at {model['artifact_uri']}")
    return {"model_id": model_id, "files": files, "expires_in": DOWNLOAD_URL_SECONDS, "export_dir": EXPORT_DIR}


def _listed(bucket: str, prefix: str) -> list[dict[str, Any]]:
    """Every object under `prefix`."""
    return [item for page in _s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for item in page.get("Contents", [])]


@router.delete("/models/<model_id>", summary="Delete one of your models",
               description="Removes the model from your catalog and deletes its files (or its archive and the "
                           "transformers folder a deploy unpacked beside it). Its record stays, as "
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
        reads = (job.get("model"), job.get("settings", {}).get("source_model_id"), *(job.get("models") or []))
        if job["status"] not in END_STATUSES and model_id in reads:  # an evaluate job reads each of its models
            raise JobError(409, "in_use", f"job {job['job_id']} ({job['status']}) reads {model_id}: cancel it or "
                                          "let it end first", [{"field": "model_id", "message": "in use by a job"}])
    context.catalog().delete(model_id, tenant)
    if model.get("kind") != "imported" and model.get("artifact_uri"):  # a registered folder is the tenant's own data
        bucket, key = split_s3(model["artifact_uri"])
        if is_archive(key):
            _delete_export(bucket, export_prefix(key))
            _s3().delete_object(Bucket=bucket, Key=key)
        else:  # the model's files, uploaded uncompressed
            for item in _listed(bucket, key):
                _s3().delete_object(Bucket=bucket, Key=item["Key"])
    return context.catalog().get(model_id, tenant)


def _delete_export(bucket: str, prefix: str) -> None:
    """The transformers folder `fusion models deploy` unpacked beside the archive, if any: its
    manifest first (a deploy then unpacks afresh rather than trust a half-deleted folder), then
    every file, found by listing (a deploy cut short wrote files without a manifest)."""
    s3 = _s3()
    s3.delete_object(Bucket=bucket, Key=export_manifest(prefix))
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            s3.delete_object(Bucket=bucket, Key=item["Key"])


class GenerateRequest(BaseModel):
    """A prompt to continue, or a conversation (ending with the user's turn) to answer."""

    model_config = ConfigDict(extra="forbid")

    prompt: Annotated[str | None, Field(default=None, min_length=1, max_length=20_000)]
    messages: Annotated[list[Message] | None, Field(default=None, min_length=1, max_length=64, description=(
        "A conversation, rendered with the model's chat template; the answer is the assistant's next turn."))]
    max_tokens: Annotated[int, Field(ge=1, le=serving.MAX_NEW_TOKENS, description="New tokens at most.")] = \
        serving.DEFAULT_NEW_TOKENS
    temperature: Annotated[float, Field(ge=0, le=serving.MAX_TEMPERATURE, description="0 is greedy.")] = \
        serving.DEFAULT_TEMPERATURE

    @model_validator(mode="after")
    def _one_input(self) -> "GenerateRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give a prompt or messages, not both")
        if self.messages is not None and self.messages[-1].role != "user":
            raise ValueError("messages must end with the user's turn")
        return self


# SageMaker's answers that mean "no endpoint of this stack serves the model": none of that name
# (ValidationException), or one this role may not invoke: another stack's, or not tagged as ours.
NOT_SERVED = ("AccessDeniedException", "AccessDenied", "ValidationException")


@router.post("/models/<model_id>/generate", summary="Try a model",
             description="Answers from the model's SageMaker endpoint (`fusion models deploy`), with its latency; "
                         "409 with the command to deploy it when no endpoint of this stack serves it.",
             responses=context.responses({200: ("The answer", Generation)}, 409, 503))
def generate(model_id: Annotated[str, Path(max_length=128)], request: GenerateRequest) -> Generation:
    from botocore.exceptions import BotoCoreError, ClientError

    model = context.catalog().get(model_id, context.tenant(router))
    if model is None:
        raise not_found("model", "model_id", model_id)
    if model.get("status", "ready") != "ready":
        raise invalid("model_id", f"{model_id} is {model['status']}")
    name = serving.endpoint_name(model_id)
    messages = [m.model_dump() for m in request.messages] if request.messages is not None else None
    body = serving.invocation(prompt=request.prompt, messages=messages, max_tokens=request.max_tokens,
                              temperature=request.temperature)
    started = time.perf_counter()
    try:
        answer = context.runtime().invoke_endpoint(EndpointName=name, ContentType=content_types.APPLICATION_JSON,
                                            Accept=content_types.APPLICATION_JSON, Body=json.dumps(body).encode())
        text = serving.answer_text(json.loads(answer["Body"].read()))
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        if code in NOT_SERVED:
            deploy = f"fusion models deploy {model_id} --instance-type ml.g5.xlarge --role <EndpointRoleArn> --stack <stack>"
            raise JobError(409, "not_deployed", f"{model_id} is not deployed: no endpoint {name} of this stack serves "
                                                f"it. Deploy it with `{deploy}`",
                           [{"field": "model_id", "message": "not deployed"}]) from None
        raise JobError(503, "endpoint_unavailable", f"endpoint {name} did not answer: {code}: "
                                                    f"{error.response.get('Error', {}).get('Message', '')}") from None
    except (BotoCoreError, ValueError) as error:
        raise JobError(503, "endpoint_unavailable", f"endpoint {name} did not answer: {error}") from None
    latency = round(1000 * (time.perf_counter() - started))
    text = text.strip() if messages is not None else text
    shown = messages + [{"role": "assistant", "content": text}] if messages is not None else None
    return {"model_id": model_id, "text": text, "messages": shown, "endpoint": name, "latency_ms": latency}


def _s3() -> Any:
    return presigning_s3(context.session())
