"""`fusion models deploy|undeploy`: a catalog model served from a SageMaker real-time endpoint.

The endpoint runs Hugging Face's LLM serving container (Text Generation Inference) at the version
SERVING_VERSION names; the SageMaker Python SDK resolves its image URI for the region, and the
GPUs of the instance type, from tables it ships (nothing is looked up online). The container
reads the model's transformers folder uncompressed from an S3 prefix:

- a published base model (`fusion-publish`) is such a folder already;
- a model a job made is its files, uploaded uncompressed: its folder is hf/ of its prefix,
  beside the compact model, served as it is;
- a model made before outputs were uploaded uncompressed has its folder in hf/ of its
  model.tar.gz. The first deploy unpacks hf/ into the prefix hf/ beside the archive (with a
  manifest, hf.manifest.json, written last: a deploy interrupted while unpacking unpacks again),
  so an endpoint never waits on decompressing an archive twice the size of what it serves.

The endpoint runs under the stack's EndpointRole (stack output EndpointRoleArn), which reads those
prefixes and pulls that image, nothing else. These commands run with the caller's AWS credentials
in the stack's account, and need the SDK: `pip install 'fusion[deploy]'` (never part of a function).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import re
import tarfile
import tempfile
from pathlib import PurePosixPath
from typing import Any

from local.client import ApiError, Client
from local.output import Output, _pairs
from shared.hf import EXPORT_DIR, export_manifest, export_prefix as archive_export_prefix
from shared.outputs import is_archive, model_prefix, split_s3
from shared.responses import CatalogModel
from shared.serving import MODEL_TAG, STACK_TAG, endpoint_name as default_endpoint_name
from shared.training_jobs import STACK_ENV
from shared.store import missing_object

# TGI 3.3 serves every family Fusion imports and exports (Llama 1-3, Mistral, Qwen2, Qwen3).
SERVING_BACKEND, SERVING_VERSION = "huggingface", "3.3.6"
MODEL_DIR = "/opt/ml/model"  # where SageMaker puts the model data in the container
# Loading a multi-GB model onto the GPUs takes minutes; SageMaker's default gives up sooner.
HEALTH_CHECK_TIMEOUT_S = 1200
ROLE_ENV = "FUSION_ENDPOINT_ROLE_ARN"
ENDPOINT_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")  # SageMaker's rule for all three names
SPOOL_BYTES = 64 << 20  # a file of the archive is held in memory up to this size, on disk beyond
HINTS = {
    "ResourceLimitExceeded": "request more 'for endpoint usage' instances of this type in Service Quotas (Amazon SageMaker)",
    "AccessDenied": "the caller needs sagemaker:Create*/Describe*/Delete* on models, endpoint configs and endpoints, "
                    "iam:PassRole on the endpoint role and S3 read/write under the artifacts bucket",
}
HINTS["AccessDeniedException"] = HINTS["AccessDenied"]


class DeployError(ApiError):
    """A deploy or undeploy that cannot go on; the message is one line for the user."""

    def line(self) -> str:
        from rich.markup import escape

        return escape(super().line())  # printed as rich markup: AWS's messages and "fusion[deploy]" hold brackets


# --- the export the container reads -------------------------------------------------------------


def deployable(model: dict[str, Any]) -> None:
    """Refuse, with the reason, a catalog model no endpoint can serve."""
    model_id = model["model_id"]
    if model.get("kind") == "imported":
        raise DeployError(f"{model_id} is your own folder, at {model.get('artifact_uri')}; deploy a model trained from it")
    if model.get("status", "ready") != "ready" or not model.get("artifact_uri"):
        raise DeployError(f"model {model_id} is not ready ({model.get('status') or 'no artifact'}"
                          + (f": {model['reason']}" if model.get("reason") else "") + ")")


def context_length(model: dict[str, Any]) -> int:
    context = model.get("context_length") or (model.get("config") or {}).get("context_length")
    if not isinstance(context, int) or context < 2:
        raise DeployError(f"model {model['model_id']} names no context length the server could use")
    return context


def export_prefix(s3: Any, model: dict[str, Any]) -> str:
    """s3:// prefix of the model's transformers folder: hf/ of the files a job uploaded, a published
    folder itself, or unpacked from an archive the first time."""
    bucket, key = split_s3(model["artifact_uri"])
    if not is_archive(key):
        folder = model_prefix(key)
        if _exists(s3, bucket, f"{folder}{EXPORT_DIR}/config.json"):  # a model a job made: its export in hf/
            return f"s3://{bucket}/{folder}{EXPORT_DIR}/"
        if not _exists(s3, bucket, folder + "config.json"):
            raise DeployError(f"model {model['model_id']} has no config.json at {model['artifact_uri']}")
        return f"s3://{bucket}/{folder}"
    prefix = archive_export_prefix(key)
    stage_export(s3, bucket, key, prefix, model["model_id"])
    return f"s3://{bucket}/{prefix}"


def stage_export(s3: Any, bucket: str, archive: str, prefix: str, model_id: str) -> list[dict[str, Any]]:
    """The files of hf/ in the archive, under `prefix`: read from the manifest when every file it
    lists is there at its size, else unpacked from the archive (streamed, one file at a time)."""
    manifest_key = export_manifest(prefix)
    manifest = _read_json(s3, bucket, manifest_key)
    if manifest and _complete(s3, bucket, prefix, manifest.get("files") or []):
        return manifest["files"]
    try:
        body = s3.get_object(Bucket=bucket, Key=archive)["Body"]
    except Exception as error:
        if missing_object(error):
            raise DeployError(f"model {model_id} has no archive at s3://{bucket}/{archive}") from None
        raise
    files = []
    with tarfile.open(fileobj=body, mode="r|gz") as tar:
        for member in tar:
            parts = [p for p in PurePosixPath(member.name).parts if p not in ("", ".")]
            if not member.isfile() or len(parts) < 2 or parts[0] != EXPORT_DIR or ".." in parts:
                continue
            name = "/".join(parts[1:])
            with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as spool:
                source = tar.extractfile(member)
                while chunk := source.read(1 << 20):
                    spool.write(chunk)
                spool.seek(0)
                s3.upload_fileobj(spool, bucket, prefix + name)
            files.append({"name": name, "size": member.size})
    if not any(f["name"] == "config.json" for f in files):
        raise DeployError(f"model {model_id} has no transformers export ({EXPORT_DIR}/ of its archive): its archive "
                          "predates exports; deploy a model a job trained")
    s3.put_object(Bucket=bucket, Key=manifest_key, Body=json.dumps({"files": files}).encode(),
                  ContentType="application/json")
    return files


def _exists(s3: Any, bucket: str, key: str) -> bool:
    try:
        s3.head_object(Bucket=bucket, Key=key)
        return True
    except Exception as error:
        if missing_object(error):
            return False
        raise


def _read_json(s3: Any, bucket: str, key: str) -> dict[str, Any] | None:
    try:
        return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    except ValueError:
        return None
    except Exception as error:
        if missing_object(error):
            return None
        raise


def _complete(s3: Any, bucket: str, prefix: str, files: list[dict[str, Any]]) -> bool:
    present = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        present |= {o["Key"][len(prefix):]: o["Size"] for o in page.get("Contents", [])}
    return bool(files) and all(present.get(f["name"]) == f["size"] for f in files)


# --- the endpoint -------------------------------------------------------------------------------


def _sdk() -> Any:
    """The SageMaker Python SDK, quiet about its config files and its v2 notice."""
    os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")
    logging.getLogger("sagemaker.config").setLevel(logging.WARNING)
    try:
        import sagemaker
    except ImportError:
        raise DeployError("deploying needs the SageMaker Python SDK: pip install 'fusion[deploy]'") from None
    logging.getLogger("sagemaker.config").setLevel(logging.WARNING)
    return sagemaker


def session(region: str | None) -> Any:
    import boto3

    sagemaker = _sdk()
    boto_session = boto3.Session(region_name=region) if region else boto3.Session()
    if not boto_session.region_name:
        raise DeployError("no AWS region: pass --region or set AWS_REGION")
    return sagemaker.Session(boto_session=boto_session)


def serving_image(region: str) -> str:
    from sagemaker.huggingface import get_huggingface_llm_image_uri

    return get_huggingface_llm_image_uri(SERVING_BACKEND, region=region, version=SERVING_VERSION)


def gpu_count(instance_type: str, region: str, given: int | None = None) -> int:
    """GPUs of one instance: as given, else from the SDK's table of the region, else from the price
    table (which names the types jobs train on; the SDK's omits some single-GPU ones)."""
    if given is not None:
        if given < 1:
            raise DeployError("--gpus must be at least 1: the LLM serving container runs on GPUs")
        return given
    from sagemaker import instance_types_gpu_info

    from shared.pricing import price_table

    known = instance_types_gpu_info.retrieve(region).get(instance_type, {}).get("Count")
    ours = price_table().gpus.get(instance_type)
    if not known and ours is None:
        raise DeployError(f"no GPU count known for {instance_type} (a GPU instance type such as ml.g5.xlarge is "
                          "needed): pass --gpus N if it has GPUs")
    return known or ours.count


def serving_environment(context: int, gpus: int) -> dict[str, str]:
    """What TGI reads: the folder, the GPUs to shard over, and the token limits of the context
    (a quarter of it kept for the answer)."""
    answer = max(1, context // 4)
    return {"HF_MODEL_ID": MODEL_DIR, "SM_NUM_GPUS": str(gpus),
            "MAX_INPUT_LENGTH": str(context - answer), "MAX_TOTAL_TOKENS": str(context)}


def _taken(client: Any, name: str) -> list[str]:
    """Which of the model, endpoint config and endpoint named `name` exist already: the SDK would
    silently reuse a model of that name, and a failed deploy removes only what it created."""
    taken = []
    for kind, call, key in (("model", client.describe_model, "ModelName"),
                            ("endpoint config", client.describe_endpoint_config, "EndpointConfigName"),
                            ("endpoint", client.describe_endpoint, "EndpointName")):
        try:
            call(**{key: name})
            taken.append(kind)
        except Exception as error:
            if not _not_found(error):
                raise
    return taken


def _not_found(error: BaseException) -> bool:
    answer = getattr(error, "response", {}).get("Error", {})
    return answer.get("Code") == "ValidationException" and "Could not find" in answer.get("Message", "")


def deploy(client: Client, model_id: str, *, instance_type: str, endpoint_name: str | None = None,
           role: str | None = None, region: str | None = None, gpus: int | None = None,
           wait: bool = True, stack: str | None = None) -> dict[str, Any]:
    """Create the model, endpoint config and endpoint (all named `endpoint_name`); what was made."""
    name = endpoint_name or default_endpoint_name(model_id)
    if not ENDPOINT_NAME.match(name):
        raise DeployError(f"endpoint name {name!r} must be letters, digits and '-' (at most 63, no '-' at either end)")
    if not role:
        raise DeployError(f"no execution role: pass --role (stack output EndpointRoleArn) or set {ROLE_ENV}")
    model = client.call("GET", f"/models/{model_id}", CatalogModel).model_dump(mode="json")
    deployable(model)
    context = context_length(model)
    sm = session(region)
    region = sm.boto_region_name
    gpus = gpu_count(instance_type, region, gpus)
    image = serving_image(region)
    taken = _taken(sm.sagemaker_client, name)
    if taken:
        raise DeployError(f"{name} is taken (a {' and '.join(taken)} of that name exist): "
                          f"`fusion models undeploy {name}` or pass --endpoint-name")
    data = export_prefix(sm.boto_session.client("s3"), model)
    environment = serving_environment(context, gpus)
    from sagemaker.model import Model

    served = Model(image_uri=image, role=role, env=environment, name=name, sagemaker_session=sm,
                   model_data={"S3DataSource": {"S3Uri": data, "S3DataType": "S3Prefix", "CompressionType": "None"}})
    # The stack's tag lets that stack's API invoke the endpoint (the console's playground), and no other's.
    tags = [{"Key": MODEL_TAG, "Value": model_id}] + ([{"Key": STACK_TAG, "Value": stack}] if stack else [])
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the SDK's wait prints a character per poll
                served.deploy(initial_instance_count=1, instance_type=instance_type, endpoint_name=name, tags=tags,
                          wait=wait, container_startup_health_check_timeout=HEALTH_CHECK_TIMEOUT_S)
    except Exception as error:
        _remove(sm, name, failed=getattr(error, "operation_name", ""))
        raise
    status = sm.sagemaker_client.describe_endpoint(EndpointName=name)["EndpointStatus"]
    return {"endpoint_name": name, "status": status, "model_id": model_id, "instance_type": instance_type,
            "image_uri": image, "model_data": data, "environment": environment, "role": role, "region": region}


def _remove(sm: Any, name: str, *, failed: str) -> None:
    """After a refused CreateEndpointConfig or CreateEndpoint, what this deploy created before it
    (nothing of that name existed at the start); the refusal itself is what the user sees."""
    steps = {"CreateEndpointConfig": (sm.delete_model,),
             "CreateEndpoint": (sm.delete_endpoint_config, sm.delete_model)}.get(failed, ())
    for delete in steps:
        try:
            delete(name)
        except Exception:  # best effort: the original error matters more
            pass


def undeploy(endpoint_name: str, *, region: str | None = None) -> dict[str, Any]:
    """Delete the endpoint, its endpoint config and the models the config serves; what was deleted."""
    sm = session(region)
    client = sm.sagemaker_client
    endpoint = client.describe_endpoint(EndpointName=endpoint_name)
    config_name = endpoint["EndpointConfigName"]
    try:
        variants = client.describe_endpoint_config(EndpointConfigName=config_name)["ProductionVariants"]
    except Exception as error:
        if not _not_found(error):
            raise
        config_name, variants = None, []
    models = [v["ModelName"] for v in variants if v.get("ModelName")]
    sm.delete_endpoint(endpoint_name)
    if config_name:
        sm.delete_endpoint_config(config_name)
    for model in models:
        try:
            sm.delete_model(model)
        except Exception as error:
            if not _not_found(error):
                raise
    return {"endpoint_name": endpoint_name, "endpoint_config": config_name, "models": models}


# --- errors, arguments, commands ----------------------------------------------------------------


def error_line(error: BaseException) -> str | None:
    """One line for an AWS refusal or an SDK failure; None for anything else (a bug: a traceback)."""
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(error, ClientError):
        answer = error.response.get("Error", {})
        code = answer.get("Code") or "Error"
        message = " ".join(str(answer.get("Message") or "").split())
        hint = HINTS.get(code)
        return f"AWS refused {error.operation_name}: {code}: {message}" + (f" ({hint})" if hint else "")
    if isinstance(error, BotoCoreError):
        return f"AWS: {' '.join(str(error).split())}"
    try:
        from sagemaker.exceptions import UnexpectedStatusException
    except ImportError:
        return None
    if isinstance(error, UnexpectedStatusException):
        return f"the endpoint did not come up: {' '.join(str(error).split())} (`fusion models undeploy` removes it)"
    return None


def _guarded(action: Any) -> Any:
    try:
        return action()
    except ApiError:
        raise
    except Exception as error:
        line = error_line(error)
        if line is None:
            raise
        raise DeployError(line) from None


def add_parsers(models: argparse._SubParsersAction) -> None:
    deploy_parser = models.add_parser("deploy", help="serve a model from a SageMaker real-time endpoint")
    deploy_parser.add_argument("model_id")
    deploy_parser.add_argument("--instance-type", required=True, help="a GPU instance, e.g. ml.g5.xlarge")
    deploy_parser.add_argument("--gpus", type=int, help="GPUs of one instance, for a type neither the SageMaker "
                               "SDK's table nor the price table knows (sets SM_NUM_GPUS)")
    deploy_parser.add_argument("--endpoint-name", help="default fusion-<model id>; also names its model and config")
    deploy_parser.add_argument("--role", default=os.environ.get(ROLE_ENV),
                               help=f"the endpoint's execution role, stack output EndpointRoleArn (env {ROLE_ENV})")
    deploy_parser.add_argument("--stack", default=os.environ.get(STACK_ENV),
                               help=f"the stack whose API (and console) may answer from the endpoint; its name "
                                    f"is tagged on it (env {STACK_ENV})")
    deploy_parser.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                               help="wait until the endpoint is in service (default: wait)")
    undeploy_parser = models.add_parser("undeploy", help="delete an endpoint, its endpoint config and its model")
    undeploy_parser.add_argument("endpoint_name")
    for parser in (deploy_parser, undeploy_parser):
        parser.add_argument("--region", help="AWS region (default: your AWS configuration's)")


def models_deploy(args: argparse.Namespace, client: Client, out: Output) -> int:
    if not out.as_json:
        out.console.print(f"deploying {args.model_id} on {args.instance_type}"
                          + (" (an endpoint takes minutes to come in service) ..." if args.wait else " ..."))
    made = _guarded(lambda: deploy(client, args.model_id, instance_type=args.instance_type,
                                   endpoint_name=args.endpoint_name, role=args.role, region=args.region,
                                   gpus=args.gpus, wait=args.wait, stack=args.stack))
    out.show(made, lambda m: _pairs([
        ("endpoint", m["endpoint_name"]), ("status", m["status"]), ("model", m["model_id"]),
        ("instance", f"{m['instance_type']} ({m['environment']['SM_NUM_GPUS']} GPU)"), ("image", m["image_uri"]),
        ("model data", f"{m['model_data']} (uncompressed)"), ("role", m["role"]),
        ("tokens", f"input up to {m['environment']['MAX_INPUT_LENGTH']}, input + output up to "
                   f"{m['environment']['MAX_TOTAL_TOKENS']}"),
        ("invoke", f"aws sagemaker-runtime invoke-endpoint --endpoint-name {m['endpoint_name']} --content-type "
                   "application/json --body '{\"inputs\": \"Hello\", \"parameters\": {\"max_new_tokens\": 64}}' "
                   "--cli-binary-format raw-in-base64-out /dev/stdout"),
        ("chat", f"aws sagemaker-runtime invoke-endpoint --endpoint-name {m['endpoint_name']} --content-type "
                 "application/json --body '{\"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}], "
                 "\"max_tokens\": 64}' --cli-binary-format raw-in-base64-out /dev/stdout")]))
    return 0


def models_undeploy(args: argparse.Namespace, client: Client, out: Output) -> int:
    gone = _guarded(lambda: undeploy(args.endpoint_name, region=args.region))
    out.show(gone, lambda g: f"deleted endpoint {g['endpoint_name']}, endpoint config {g['endpoint_config'] or '-'}, "
                             f"model {', '.join(g['models']) or '-'}")
    return 0


COMMANDS = {("models", "deploy"): models_deploy, ("models", "undeploy"): models_undeploy}
