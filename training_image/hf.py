"""Import of Hugging Face checkpoints (Llama, Mistral, Qwen2, Qwen3) into model directories.

The tensors are renamed, not converted: the model directory keeps the checkpoint's dtype, so a
bf16 source gives a bf16 artifact and an untouched model exports back to identical tensors.
What the decoder does not compute is refused by `shared.hf` before any tensor is read.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from shared.hf import hf_names
from training_image.hf_folder import read_folder
from training_image.modeldir import save_state_dir


def import_hf(src: str | Path, out: str | Path) -> Path:
    """A model directory from a Hugging Face folder (config.json, safetensors shards with or
    without their index, tokenizer.json, tokenizer_config.json, generation_config.json)."""
    source = Path(src)
    config, shards, tokenizer = read_folder(source)
    ours_by_hf = {hf: ours for ours, hf in hf_names(config).items()}
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as tensors:
            for name in tensors.keys():
                if name in ours_by_hf:  # a tied checkpoint's duplicate lm_head is skipped
                    state[ours_by_hf[name]] = tensors.get_tensor(name)
    return save_state_dir(out, config, state, tokenizer)
