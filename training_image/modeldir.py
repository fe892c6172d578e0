"""Model directories: config.json (the exact ModelConfig), model.safetensors, tokenizer.json, metrics.json.

A directory is written whole into a temporary sibling and then renamed into place, so a crash
mid-write never leaves a directory that loads wrong. Where the target already exists (SageMaker
creates /opt/ml/model itself, possibly as a mount point) each file is replaced atomically instead,
config.json last.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from tokenizers import Tokenizer

from shared.shapes import ModelConfig
from training_image.model import Decoder
from training_image.tokenizer import load_tokenizer

CONFIG, WEIGHTS, TOKENIZER, METRICS = "config.json", "model.safetensors", "tokenizer.json", "metrics.json"
ARCHIVE = "model.tar.gz"


def save_model_dir(path: str | Path, model: Decoder, tokenizer: Tokenizer, metrics: dict | None = None) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        # Weights are stored in fp32 on CPU whatever the training device, so every reader agrees.
        cpu_model = model if _on_cpu_fp32(model) else _cpu_fp32_copy(model)
        save_model(cpu_model, str(staging / WEIGHTS))
        tokenizer.save(str(staging / TOKENIZER))
        if metrics is not None:
            (staging / METRICS).write_text(json.dumps(metrics, indent=2))
        (staging / CONFIG).write_text(model.config.model_dump_json(indent=2))
        if not target.exists():
            os.rename(staging, target)
            return target
        for name in (WEIGHTS, TOKENIZER, METRICS, CONFIG):
            if (staging / name).exists():
                _replace_file(staging / name, target / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _on_cpu_fp32(model: Decoder) -> bool:
    return all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())


def _cpu_fp32_copy(model: Decoder) -> Decoder:
    copy = Decoder(model.config)
    copy.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()})
    return copy


def _replace_file(source: Path, destination: Path) -> None:
    partial = destination.with_name(f".{destination.name}.partial")
    shutil.copyfile(source, partial)
    os.replace(partial, destination)


def load_model_dir(path: str | Path) -> tuple[Decoder, Tokenizer]:
    """(model in fp32 on CPU, tokenizer) from a model directory or a directory holding model.tar.gz."""
    directory = find_model_dir(path)
    config = ModelConfig.model_validate_json((directory / CONFIG).read_text())
    model = Decoder(config)
    missing, unexpected = load_model(model, str(directory / WEIGHTS), strict=False)
    if missing or unexpected:
        raise ValueError(f"{directory / WEIGHTS} does not match its config.json: missing {missing}, unexpected {unexpected}")
    return model, load_tokenizer(directory / TOKENIZER)


def find_model_dir(path: str | Path) -> Path:
    """The directory holding config.json: `path` itself, or the unpacked model.tar.gz inside it."""
    root = Path(path)
    if (root / CONFIG).is_file():
        return root
    archive = root / ARCHIVE if root.is_dir() else root
    if archive.is_file() and archive.name.endswith(".tar.gz"):
        unpacked = Path(tempfile.mkdtemp(prefix="fusion-model-"))
        with tarfile.open(archive) as tar:
            tar.extractall(unpacked, filter="data")
        configs = sorted(unpacked.rglob(CONFIG), key=lambda p: len(p.parts))
        if configs:
            return configs[0].parent
        raise ValueError(f"{archive} holds no {CONFIG}")
    raise FileNotFoundError(f"no model at {root}: expected {CONFIG} + {WEIGHTS} + {TOKENIZER}, or {ARCHIVE}")
