"""Model directories: config.json (the exact ModelConfig), the weights, tokenizer.json,
tokenizer_config.json, generation_config.json and chat_template.jinja when the source had them,
metrics.json.

Weights are stored in the config's dtype (bf16 stays bf16); a loaded model is fp32 for training.
They are model.safetensors, or shards with their index once they exceed the shard size
(training_image.shards); every reader takes both. A job's output holds them once: where its
transformers export (hf/, training_image.export) needs no padding, the export's tensors are the
model's own under their transformers names, and the directory keeps no copy: readers take the
weights from hf/ then (`stored_weights`). A contracted model, padded in its export, keeps its
compact weights beside it.

A job given a model.tar.gz (a catalog model from before uncompressed outputs) extracts it once
per node (`unpack`), not once per rank.

A directory is written whole into a temporary sibling and then renamed into place, so a crash
mid-write never leaves a directory that loads wrong. Where the target already exists (SageMaker
creates /opt/ml/model itself, possibly as a mount point) each file is replaced atomically instead,
config.json last.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from shared.contracts import METRICS_FILE
from shared.hf import EXPORT_DIR, INDEX, SINGLE, hf_names, padded_config, shard_files, tensor_shapes
from shared.shapes import ModelConfig
from training_image.hf_folder import read_folder
from training_image.model import Decoder
from training_image.shards import SHARD_BYTES, write_shards
from training_image.tokenizer import CHAT_TEMPLATE, GENERATION_CONFIG, TOKENIZER_CONFIG, TextTokenizer, as_text_tokenizer, load_tokenizer

CONFIG, TOKENIZER, METRICS = "config.json", "tokenizer.json", METRICS_FILE
WEIGHTS = SINGLE  # the weights in one file; past SHARD_BYTES, shards listed in INDEX
ARCHIVE = "model.tar.gz"


def save_model_dir(
    path: str | Path, model: Decoder, tokenizer: Tokenizer | TextTokenizer, metrics: dict | None = None,
    shard_bytes: int = SHARD_BYTES, weights: bool = True,
) -> Path:
    """`weights` False: the directory's weights are its export's, in hf/ (shares_export_weights)."""
    return save_state_dir(path, model.config, model.state_dict(), tokenizer, metrics, shard_bytes, weights)


def shares_export_weights(config: ModelConfig) -> bool:
    """Whether the transformers export of `config` holds exactly its tensors (renamed): every layer
    as wide as the export's, so nothing is padded."""
    return all(layer == padded_config(config).layers[0] for layer in config.layers)


def save_state_dir(
    path: str | Path,
    config: ModelConfig,
    state: dict[str, torch.Tensor],
    tokenizer: Tokenizer | TextTokenizer,
    metrics: dict | None = None,
    shard_bytes: int = SHARD_BYTES,
    weights: bool = True,
) -> Path:
    """A model directory from a state dict of our names (what a Decoder of `config` holds);
    without its weights when `weights` is False (they are its export's, in hf/)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        if weights:
            save_weights(state, config, staging, shard_bytes)
        as_text_tokenizer(tokenizer).save(staging / TOKENIZER)
        if metrics is not None:
            (staging / METRICS).write_text(json.dumps(metrics, indent=2))
        (staging / CONFIG).write_text(config.model_dump_json(indent=2))
        if not target.exists():
            os.rename(staging, target)
            return target
        # New shards first, then their index (or the single file), then the stale weights go:
        # until config.json is replaced last, the index found names a complete set of files.
        weights = sorted(p.name for p in staging.glob("*.safetensors"))
        for name in [*weights, INDEX, TOKENIZER, TOKENIZER_CONFIG, GENERATION_CONFIG, CHAT_TEMPLATE, METRICS]:
            if (staging / name).exists():
                _replace_file(staging / name, target / name)
            elif name == CHAT_TEMPLATE:
                (target / name).unlink(missing_ok=True)
        if not (staging / INDEX).exists():
            (target / INDEX).unlink(missing_ok=True)
        for stale in target.glob("*.safetensors"):
            if stale.name not in weights:
                stale.unlink()
        _replace_file(staging / CONFIG, target / CONFIG)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def save_weights(state: dict[str, torch.Tensor], config: ModelConfig, directory: Path, shard_bytes: int = SHARD_BYTES) -> None:
    """The weights on CPU in the config's dtype, whatever the training device, so every reader
    agrees, in one file or in shards of shard_bytes; a tied lm_head is stored once, as the embedding."""
    dtype = getattr(torch, config.dtype)
    tensors = {
        name: tensor.detach().to("cpu", dtype).contiguous()
        for name, tensor in state.items()
        if not (config.tie_embeddings and name == "lm_head.weight")
    }
    write_shards(tensors, directory, shard_bytes)


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a model directory: the shards its index lists, or the one file."""
    index = json.loads((directory / INDEX).read_text()) if (directory / INDEX).is_file() else None
    files = [directory / name for name in shard_files(index)]
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing" + (f" ({INDEX} lists it)" if index is not None else ""))
    return files


def stored_weights(directory: Path, config: ModelConfig) -> tuple[list[Path], dict[str, str]]:
    """(the safetensors files holding the directory's weights, our tensor name -> its name in
    them): its own, or where it keeps none, its export's in hf/ under the transformers names."""
    export = directory / EXPORT_DIR
    own = (directory / SINGLE).is_file() or (directory / INDEX).is_file()
    if not own and ((export / SINGLE).is_file() or (export / INDEX).is_file()):
        return weight_files(export), hf_names(config)
    return weight_files(directory), {name: name for name in tensor_shapes(config)}


def load_weights(model: Decoder, directory: Path) -> None:
    """The directory's weights into `model` (converted to its dtype), one shard at a time, so the
    host holds the model and at most one shard's tensors besides."""
    files, names = stored_weights(directory, model.config)
    if any(ours != theirs for ours, theirs in names.items()):
        load_renamed_weights(model, files, names)
        return
    expected = set(model.state_dict())
    if model.config.tie_embeddings:
        expected.discard("lm_head.weight")
    found: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as tensors:
            state = {name: tensors.get_tensor(name) for name in tensors.keys()}
        found |= state.keys()
        model.load_state_dict({name: t for name, t in state.items() if name in expected}, strict=False)
        del state
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise ValueError(f"the weights in {directory} do not match its config.json: missing {missing}, unexpected {unexpected}")


def load_renamed_weights(model: Decoder, files: list[Path], names: dict[str, str]) -> None:
    """Weights stored under other names (our name -> theirs, e.g. a Hugging Face folder's) into
    `model`, one file at a time; tensors the model has no use for (a tied duplicate lm_head) are
    skipped."""
    expected = set(model.state_dict())
    if model.config.tie_embeddings:
        expected.discard("lm_head.weight")
    ours_by_theirs = {theirs: ours for ours, theirs in names.items() if ours in expected}
    found: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as tensors:
            state = {ours_by_theirs[name]: tensors.get_tensor(name) for name in tensors.keys() if name in ours_by_theirs}
        found |= state.keys()
        model.load_state_dict(state, strict=False)
        del state
    missing = sorted(expected - found)
    if missing:
        raise ValueError(f"the weights in {files[0].parent} lack {missing}")


def _replace_file(source: Path, destination: Path) -> None:
    partial = destination.with_name(f".{destination.name}.partial")
    shutil.copyfile(source, partial)
    os.replace(partial, destination)


def load_model_dir(path: str | Path) -> tuple[Decoder, Tokenizer]:
    """(model in fp32 on CPU, tokenizer) from a model directory or a directory holding model.tar.gz."""
    directory = find_model_dir(path)
    if is_hf_folder(directory):  # a tenant's own checkpoint, registered as it is: read in place, renamed
        config, files, tokenizer = read_folder(directory)
        model = Decoder(config)
        load_renamed_weights(model, files, hf_names(config))
        return model, tokenizer
    config = ModelConfig.model_validate_json((directory / CONFIG).read_text())
    model = Decoder(config)
    load_weights(model, directory)
    return model, load_tokenizer(directory / TOKENIZER)


def open_model_dir(path: str | Path) -> tuple[ModelConfig, Tokenizer, list[Path], dict[str, str]]:
    """(config, tokenizer, the safetensors files, our tensor name -> its name in them), no weight
    read: for a reader that takes only its part of each tensor. A Hugging Face folder is read as
    it is (its tensors are ours renamed), not imported into a directory first."""
    directory = find_model_dir(path)
    if is_hf_folder(directory):
        config, files, tokenizer = read_folder(directory)
        return config, tokenizer, files, hf_names(config)
    config = ModelConfig.model_validate_json((directory / CONFIG).read_text())
    files, names = stored_weights(directory, config)
    return config, load_tokenizer(directory / TOKENIZER), files, names


def is_hf_folder(directory: Path) -> bool:
    """A Hugging Face config.json names its model_type; ours never does."""
    return "model_type" in json.loads((directory / CONFIG).read_text())


def archive_of(path: str | Path) -> Path | None:
    """The model.tar.gz that `path` is or holds, where it is no model directory itself."""
    root = Path(path)
    if (root / CONFIG).is_file():
        return None
    archive = root / ARCHIVE if root.is_dir() else root
    return archive if archive.is_file() and archive.name.endswith(".tar.gz") else None


def unpack(archive: Path, into: Path) -> Path:
    """Extract `archive` into `into` whole (into a hidden sibling, then renamed), or nothing when a
    previous call did: one process per node calls it, the others wait for it and read `into`."""
    if not into.is_dir():
        staging = Path(tempfile.mkdtemp(prefix=f".{into.name}.", dir=into.parent))
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(staging, filter="data")
            os.rename(staging, into)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return _holding_config(into, archive)


def _holding_config(unpacked: Path, archive: Path) -> Path:
    """The shallowest folder of an unpacked archive that holds config.json."""
    configs = sorted(unpacked.rglob(CONFIG), key=lambda p: len(p.parts))
    if configs:
        return configs[0].parent
    raise ValueError(f"{archive} holds no {CONFIG}")


def find_model_dir(path: str | Path) -> Path:
    """The directory holding config.json: `path` itself, or the unpacked model.tar.gz inside it."""
    root = Path(path)
    if (root / CONFIG).is_file():
        return root
    archive = root / ARCHIVE if root.is_dir() else root
    if archive.is_file() and archive.name.endswith(".tar.gz"):
        unpacked = Path(tempfile.mkdtemp(prefix="fusion-model-"))
        atexit.register(shutil.rmtree, unpacked, True)  # a copy for this process only (0.5 GB at `small`)
        with tarfile.open(archive) as tar:
            tar.extractall(unpacked, filter="data")
        return _holding_config(unpacked, archive)
    raise FileNotFoundError(f"no model at {root}: expected {CONFIG} + {WEIGHTS} + {TOKENIZER}, or {ARCHIVE}")
