"""Model directories: config.json (the exact ModelConfig), model.safetensors, tokenizer.json,
tokenizer_config.json, generation_config.json when the source had one, metrics.json.

Weights are stored in the config's dtype (bf16 stays bf16); a loaded model is fp32 for training.

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
from safetensors.torch import load_model, save_file
from tokenizers import Tokenizer

from shared.shapes import ModelConfig
from training_image.model import Decoder
from training_image.tokenizer import GENERATION_CONFIG, TOKENIZER_CONFIG, TextTokenizer, as_text_tokenizer, load_tokenizer

CONFIG, WEIGHTS, TOKENIZER, METRICS = "config.json", "model.safetensors", "tokenizer.json", "metrics.json"
ARCHIVE = "model.tar.gz"


def save_model_dir(
    path: str | Path, model: Decoder, tokenizer: Tokenizer | TextTokenizer, metrics: dict | None = None
) -> Path:
    return save_state_dir(path, model.config, model.state_dict(), tokenizer, metrics)


def save_state_dir(
    path: str | Path,
    config: ModelConfig,
    state: dict[str, torch.Tensor],
    tokenizer: Tokenizer | TextTokenizer,
    metrics: dict | None = None,
) -> Path:
    """A model directory from a state dict of our names (what a Decoder of `config` holds)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save_weights(state, config, staging / WEIGHTS)
        as_text_tokenizer(tokenizer).save(staging / TOKENIZER)
        if metrics is not None:
            (staging / METRICS).write_text(json.dumps(metrics, indent=2))
        (staging / CONFIG).write_text(config.model_dump_json(indent=2))
        if not target.exists():
            os.rename(staging, target)
            return target
        for name in (WEIGHTS, TOKENIZER, TOKENIZER_CONFIG, GENERATION_CONFIG, METRICS, CONFIG):
            if (staging / name).exists():
                _replace_file(staging / name, target / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def save_weights(state: dict[str, torch.Tensor], config: ModelConfig, path: Path) -> None:
    """The weights on CPU in the config's dtype, whatever the training device, so every reader
    agrees; a tied lm_head is stored once, as the embedding."""
    dtype = getattr(torch, config.dtype)
    tensors = {
        name: tensor.detach().to("cpu", dtype).contiguous()
        for name, tensor in state.items()
        if not (config.tie_embeddings and name == "lm_head.weight")
    }
    save_file(tensors, str(path), metadata={"format": "pt"})


def _replace_file(source: Path, destination: Path) -> None:
    partial = destination.with_name(f".{destination.name}.partial")
    shutil.copyfile(source, partial)
    os.replace(partial, destination)


def load_model_dir(path: str | Path) -> tuple[Decoder, Tokenizer]:
    """(model in fp32 on CPU, tokenizer) from a model directory or a directory holding model.tar.gz."""
    directory = find_model_dir(path)
    if is_hf_folder(directory):  # a tenant's own checkpoint, registered as it is
        from training_image.hf import import_hf

        directory = import_hf(directory, Path(tempfile.mkdtemp(prefix="fusion-import-")) / "model")
    config = ModelConfig.model_validate_json((directory / CONFIG).read_text())
    model = Decoder(config)
    missing, unexpected = load_model(model, str(directory / WEIGHTS), strict=False)
    if missing or unexpected:
        raise ValueError(f"{directory / WEIGHTS} does not match its config.json: missing {missing}, unexpected {unexpected}")
    return model, load_tokenizer(directory / TOKENIZER)


def is_hf_folder(directory: Path) -> bool:
    """A Hugging Face config.json names its model_type; ours never does."""
    return "model_type" in json.loads((directory / CONFIG).read_text())


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
