"""`fusion models register DIR --name NAME`: a Hugging Face folder on this machine becomes a base
model of the caller's catalog, against the local service and a deployed one alike.

The API hands out a fresh folder under the caller's data prefix with a presigned PUT for each
file (`POST /models/uploads`); each file is uploaded to its URL, then `POST /models` checks the
folder (config.json and the safetensors headers) and registers it, ready or rejected with the
reason. Only the files a model needs are sent: config and tokenizer files, the chat template,
and the safetensors weights with their index.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from local.client import ApiError, Client
from local.output import Output, _pairs
from shared.hf_check import MAX_UPLOAD_BYTES, MAX_UPLOAD_FILES, UPLOAD_NAME
from shared.responses import CatalogModel, ModelUpload

# What a model folder needs; other files (README, training logs, other weight formats) stay here.
SUFFIXES = (".json", ".safetensors", ".jinja", ".txt", ".model")


def folder_files(folder: Path) -> list[Path]:
    """The files of a model folder to upload, in sorted order; ApiError naming what is wrong."""
    if not (folder / "config.json").is_file():
        raise ApiError(f"{folder} is no Hugging Face model folder: it has no config.json")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not any(p.suffix == ".safetensors" for p in files):
        raise ApiError(f"{folder} holds no .safetensors weights (convert other formats with transformers' save_pretrained)")
    if len(files) > MAX_UPLOAD_FILES:
        raise ApiError(f"{folder} has {len(files)} files to upload; at most {MAX_UPLOAD_FILES}")
    for file in files:
        name = file.relative_to(folder).as_posix()
        if not UPLOAD_NAME.fullmatch(name):
            raise ApiError(f"cannot upload {name!r}: a name of A-Z a-z 0-9 . _ - at most four folders deep")
        if file.stat().st_size > MAX_UPLOAD_BYTES:
            raise ApiError(f"{name} is over 5 GiB, more than one upload carries: save the model in smaller shards "
                           "(save_pretrained(..., max_shard_size='4GB'))")
    return files


def register(client: Client, folder: Path, name: str) -> CatalogModel:
    """Upload the folder's files and register it; the catalog model (ready, or rejected with why)."""
    import requests

    files = folder_files(folder)
    names = [file.relative_to(folder).as_posix() for file in files]
    upload = client.call("POST", "/models/uploads", ModelUpload,
                         {"files": [{"name": n, "bytes": f.stat().st_size} for n, f in zip(names, files)]})
    urls = {u.name: u.url for u in upload.files}
    for name_in_folder, file in zip(names, files):
        with file.open("rb") as body:
            put = requests.put(urls[name_in_folder], data=body, timeout=3600)
        if put.status_code >= 300:
            raise ApiError(f"uploading {name_in_folder} failed: HTTP {put.status_code} {put.text[:200]}")
    return client.call("POST", "/models", CatalogModel, {"name": name, "uri": upload.uri})


def add_parsers(models: argparse._SubParsersAction) -> None:
    parser = models.add_parser("register", help="upload a Hugging Face folder here and add it to your catalog")
    parser.add_argument("folder", type=Path, help="config.json, safetensors weights, tokenizer.json (+ chat template)")
    parser.add_argument("--name", required=True, help="the catalog name of the model")


def models_register(args: argparse.Namespace, client: Client, out: Output) -> int:
    model = register(client, args.folder, args.name)
    out.show(model, lambda m: _pairs([
        ("model", m.model_id), ("name", m.name), ("status", m.status),
        *([("reason", m.reason)] if m.reason else []),
        *([("family", m.family), ("parameters", f"{m.parameters:,}"), ("depth", str(m.depth)),
           ("context", str(m.context_length))] if m.status == "ready" else []),
        ("folder", m.artifact_uri or "-")]))
    if model.status != "ready":
        raise ApiError(f"model {model.model_id} was rejected: {model.reason}")
    return 0


COMMANDS = {("models", "register"): models_register}
