"""The reader of a Hugging Face folder (config.json, safetensors shards with or without their index,
tokenizer.json and its companions), shared by the importer (training_image.hf) and the model
directory loader (training_image.modeldir), which reads such a folder as it is.

Nothing here writes: what the decoder does not compute is refused by `shared.hf` from the
headers, before any tensor is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from shared.hf import INDEX, SINGLE, UnsupportedCheckpoint, check_tensors, model_config_from_hf, parse_header, shard_files
from shared.shapes import ModelConfig
from training_image.tokenizer import END_OF_TEXT, GENERATION_CONFIG, TOKENIZER_CONFIG, TextTokenizer, read_chat_template


def read_folder(source: Path) -> tuple[ModelConfig, list[Path], TextTokenizer]:
    """(our config in the checkpoint's dtype, its shard files, its tokenizer), all checked."""
    config, shards = read_folder_config(source)
    tokenizer = read_tokenizer(source, json.loads((source / "config.json").read_text()))
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise UnsupportedCheckpoint(f"the tokenizer has {tokenizer.get_vocab_size()} tokens, the model only {config.vocab_size}")
    return config, shards, tokenizer


def read_folder_config(source: Path) -> tuple[ModelConfig, list[Path]]:
    """(our config in the checkpoint's dtype, its shard files), checked against the safetensors headers."""
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {source}")
    hf = json.loads((source / "config.json").read_text())
    index = json.loads((source / INDEX).read_text()) if (source / INDEX).is_file() else None
    if index is None and not (source / SINGLE).is_file():
        files = sorted(p.name for p in source.glob("*.safetensors"))
        if len(files) != 1:
            raise FileNotFoundError(f"no {INDEX} and no single .safetensors file in {source}")
        names = files
    else:
        names = shard_files(index)
    shards = [source / name for name in names]
    for shard in shards:
        if not shard.is_file():
            raise FileNotFoundError(f"{shard.name}, listed in {INDEX}, is not in {source}")
    config = model_config_from_hf(hf)
    dtype = check_tensors(config, {shard.name: _header(shard) for shard in shards})
    return config.model_copy(update={"dtype": dtype}), shards


def _header(path: Path) -> dict[str, Any]:
    with path.open("rb") as file:
        prefix = file.read(8)
        length, _ = parse_header(prefix)
        _, header = parse_header(prefix + file.read(length))
    if header is None:
        raise ValueError(f"{path.name} ends inside its safetensors header")
    return header


def read_tokenizer(source: Path, hf: dict[str, Any]) -> TextTokenizer:
    """The source's tokenizer.json with its tokenizer_config.json and generation_config.json."""
    if not (source / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {source} (a `tokenizers` tokenizer is required)")
    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    config = json.loads((source / TOKENIZER_CONFIG).read_text()) if (source / TOKENIZER_CONFIG).is_file() else None
    if config is None:  # only config.json says which ids are special
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": _token(tokenizer, hf.get("bos_token_id")),
            "eos_token": _token(tokenizer, hf.get("eos_token_id")) or END_OF_TEXT,
        }
    for key in ("pad_token", "unk_token"):  # config.json may name them where tokenizer_config.json does not
        if config.get(key) is None and _token(tokenizer, hf.get(f"{key}_id")) is not None:
            config[key] = _token(tokenizer, hf.get(f"{key}_id"))
    generation = json.loads((source / GENERATION_CONFIG).read_text()) if (source / GENERATION_CONFIG).is_file() else None
    return TextTokenizer(tokenizer, config, generation, read_chat_template(source))


def _token(tokenizer: Tokenizer, token_id: int | list[int] | None) -> str | None:
    if isinstance(token_id, list):
        token_id = token_id[0] if token_id else None
    return tokenizer.id_to_token(token_id) if token_id is not None else None
