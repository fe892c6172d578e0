"""A catalog model on this machine: download its files, write its transformers folder, sample from it.

A model a job made is its files (GET /models/{id}/download gives each a presigned URL and its path):
the compact model directory at the root, the one jobs train and contract, and the transformers
folder in hf/. A published base model, or one made before outputs were uploaded uncompressed, is an
archive (model.tar.gz) laid out the same, unpacked here. Torch is imported only by the commands that
run the model, so the rest of the CLI starts fast.
"""

from __future__ import annotations

import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import requests

from local.client import ApiError
from local.sampling import sample
from shared.hf import EXPORT_DIR
from shared.responses import Download

CHUNK = 1 << 20
DOWNLOAD_TIMEOUT_S = 60


class DownloadError(ApiError):
    """The archive could not be fetched or read; the message is one line for the user."""


def fetch_model(client: Any, model_id: str, into: Path) -> Path:
    """Download the model into `into`/model through its presigned URLs: each of its files at its
    path, or its archive, unpacked."""
    answer = client.call("GET", f"/models/{model_id}/download", Download)
    folder = into / "model"
    folder.mkdir(parents=True, exist_ok=True)
    if answer.url is None:
        for entry in answer.files:
            target = folder / entry.path
            if not entry.path or not target.resolve().is_relative_to(folder.resolve()):
                raise DownloadError(f"{model_id} names a file outside its folder: {entry.path!r}")
            target.parent.mkdir(parents=True, exist_ok=True)
            _get(entry.url, target, model_id)
        return folder
    archive = into / "model.tar.gz"
    _get(answer.url, archive, model_id)
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(folder, filter="data")
    except (tarfile.TarError, OSError) as error:
        raise DownloadError(f"the archive of {model_id} cannot be unpacked: {error}") from None
    archive.unlink()
    return folder


def _get(url: str, target: Path, model_id: str) -> None:
    """One presigned GET, streamed into `target`."""
    try:
        with requests.get(url, stream=True, timeout=DOWNLOAD_TIMEOUT_S) as response:
            if response.status_code != 200:
                raise DownloadError(f"downloading {model_id} failed: HTTP {response.status_code} from the artifact store")
            with target.open("wb") as out:
                for chunk in response.iter_content(CHUNK):
                    out.write(chunk)
    except requests.RequestException as error:
        raise DownloadError(f"downloading {model_id} failed: {error}") from None


def download(client: Any, model_id: str, out: Path) -> Path:
    """The model's transformers folder in `out`; written here from the compact directory when
    the model predates exports (base models made by `fusion-train init`)."""
    with tempfile.TemporaryDirectory(prefix="fusion-download-") as work:
        unpacked = fetch_model(client, model_id, Path(work))
        export = unpacked / EXPORT_DIR
        if out.exists() and any(out.iterdir()):
            raise DownloadError(f"{out} exists and is not empty")
        out.mkdir(parents=True, exist_ok=True)
        if (export / "config.json").is_file():
            for item in export.iterdir():
                shutil.move(str(item), out / item.name)
        else:
            from training_image.cli import export_model_dir

            export_model_dir(unpacked, out)
    return out


def generate_text(client: Any, model: str, prompt: str, **sampling: Any) -> str:
    """Sample from a catalog model id, or from a model directory (or model.tar.gz) on this machine."""
    local = Path(model)
    if local.exists():
        return sample(local, prompt, **sampling)
    with tempfile.TemporaryDirectory(prefix="fusion-generate-") as work:
        return sample(fetch_model(client, model, Path(work)), prompt, **sampling)
