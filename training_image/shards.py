"""Safetensors weights as one file or as shards with an index, the layout Hugging Face uses:
`model.safetensors`, or `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`
mapping every tensor to its shard. Every writer of weights shards them with one shard size."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from shared.hf import INDEX, SINGLE

SHARD_BYTES = 2 * 1024**3


def write_shards(tensors: dict[str, torch.Tensor], target: Path, shard_bytes: int = SHARD_BYTES) -> None:
    """Shards of at most shard_bytes each (a larger tensor gets one of its own), in name order;
    one file needs no index."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    for stale in list(target.glob("*.safetensors")) + [target / INDEX]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], str(target / SINGLE), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(target / name), metadata={"format": "pt"})
        weight_map.update({tensor: name for tensor in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (target / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
