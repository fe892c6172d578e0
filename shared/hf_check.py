"""Check a Hugging Face folder in S3 without torch and without downloading its weights.

config.json is read whole (it is small); each safetensors shard is read only as far as its
header, with two ranged GETs (the 8-byte length, then the JSON header). That is enough to know
the family, every tensor's name, shape and dtype, and so whether the training image can import
it: the same tables (`shared.hf`) decide both.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

from shared.hf import INDEX, UnsupportedCheckpoint, check_tensors, model_config_from_hf, parse_header, shard_files
from shared.pricing import price_table
from shared.shapes import ModelConfig
from shared.store import missing_object, now
from shared.tenancy import data_uri_prefix

CONFIG_LIMIT = 1024 * 1024  # bytes of config.json / the index read at most
# A folder uploaded for registration: each file one presigned PUT (at most 5 GiB, S3's limit for
# one), named by its path in the folder (a few levels deep at most, no "..").
MAX_UPLOAD_FILES = 512
MAX_UPLOAD_BYTES = 5 * 1024**3
UPLOAD_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}(/[A-Za-z0-9_][A-Za-z0-9._-]{0,127}){0,3}$")
UPLOAD_URL_SECONDS = 3600


def new_upload_folder(bucket: str, owner: str) -> str:
    """A fresh folder under the tenant's data prefix (shared.tenancy) for a model folder's files."""
    return f"{data_uri_prefix(bucket, owner)}models/up-{secrets.token_hex(8)}/"


class FolderRejected(ValueError):
    """The folder is not a model Fusion can train; the message says why."""


def max_parameters() -> int:
    """The largest model a job may start from: the largest bounded tier of the price table."""
    return max(t.max_parameters for t in price_table().tiers if t.max_parameters is not None)


def split_folder(uri: str) -> tuple[str, str]:
    """(bucket, key prefix ending in '/') of an s3:// folder URI."""
    if not uri.startswith("s3://"):
        raise FolderRejected(f"{uri!r} is not an s3:// URI")
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    if not bucket or not prefix.strip("/"):
        raise FolderRejected(f"{uri!r} names no folder")
    return bucket, prefix.rstrip("/") + "/"


def check_folder(s3: Any, uri: str) -> ModelConfig:
    """Our config of the folder's model (in its dtype), or FolderRejected with the reason."""
    bucket, prefix = split_folder(uri)
    hf = _json(s3, bucket, prefix + "config.json", required=True)
    index = _json(s3, bucket, prefix + INDEX, required=False)
    try:
        config = model_config_from_hf(hf)
        headers = {name: _header(s3, bucket, prefix + name) for name in shard_files(index)}
        config = config.model_copy(update={"dtype": check_tensors(config, headers)})
    except (UnsupportedCheckpoint, ValueError, KeyError, TypeError) as error:
        raise FolderRejected(_reason(error)) from None
    if not _exists(s3, bucket, prefix + "tokenizer.json"):
        raise FolderRejected("no tokenizer.json in the folder (a `tokenizers` tokenizer is required)")
    if config.parameters() > max_parameters():
        raise FolderRejected(f"{config.parameters():,} parameters: larger than the largest tier ({max_parameters():,})")
    return config


def _reason(error: Exception) -> str:
    if isinstance(error, KeyError):
        return f"config.json lacks {error.args[0]!r}"
    return str(error)


def _json(s3: Any, bucket: str, key: str, *, required: bool) -> dict[str, Any] | None:
    try:
        body = s3.get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{CONFIG_LIMIT - 1}")["Body"].read()
    except Exception as exc:
        if not missing_object(exc):
            raise
        if required:
            raise FolderRejected(f"no {key.rsplit('/', 1)[-1]} in the folder") from None
        return None
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FolderRejected(f"{key.rsplit('/', 1)[-1]} is not JSON (or larger than {CONFIG_LIMIT} bytes)") from None
    if not isinstance(value, dict):
        raise FolderRejected(f"{key.rsplit('/', 1)[-1]} is not a JSON object")
    return value


def _header(s3: Any, bucket: str, key: str) -> dict[str, Any]:
    name = key.rsplit("/", 1)[-1]
    try:
        prefix = s3.get_object(Bucket=bucket, Key=key, Range="bytes=0-7")["Body"].read()
        length, _ = parse_header(prefix)
        rest = s3.get_object(Bucket=bucket, Key=key, Range=f"bytes=8-{8 + length - 1}")["Body"].read()
    except ValueError as error:
        raise FolderRejected(f"{name}: {error}") from None
    except Exception as exc:
        if not missing_object(exc):
            raise
        raise FolderRejected(f"{name} is not in the folder") from None
    try:
        _, header = parse_header(prefix + rest)
    except ValueError as error:
        raise FolderRejected(f"{name}: {error}") from None
    if header is None:
        raise FolderRejected(f"{name} ends inside its safetensors header")
    return header


def _exists(s3: Any, bucket: str, key: str) -> bool:
    try:
        s3.get_object(Bucket=bucket, Key=key, Range="bytes=0-0")["Body"].read()
    except Exception as exc:
        if not missing_object(exc):
            raise
        return False
    return True


def folder_model(uri: str, name: str, owner: str, s3: Any) -> dict[str, Any]:
    """The catalog record of a registered folder: status ready with its shape, or rejected with the reason."""
    record: dict[str, Any] = {
        "model_id": f"m-{secrets.token_hex(10)}",
        "name": name,
        "owner": owner,
        "kind": "imported",
        "parent_id": None,
        "job_id": None,
        "perplexity": None,
        "cost": None,
        "dataset": None,
        "artifact_uri": uri.rstrip("/") + "/",
        "created_at": now(),
    }
    try:
        config = check_folder(s3, uri)
    except FolderRejected as error:
        return {**record, "status": "rejected", "reason": str(error)}
    return {**record, "status": "ready", "reason": None, "family": config.family, "parameters": config.parameters(),
            "depth": config.n_layers, "context_length": config.context_length, "dtype": config.dtype,
            "config": config.model_dump(mode="json")}
