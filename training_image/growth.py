"""Growth: LLaMA Pro block expansion (docs/architecture.md §3).

After every 4 blocks of the base (at least once) a new block is inserted, a copy of the block
before it with the attention output projection and the MLP down projection set to zero. A zeroed
output projection makes the new block's residual branches add exactly nothing, so the grown model
computes the same function as the base, and training then puts the new capacity to use.

Growth is a pure function of the base's config: every tensor of the grown model is a tensor of
the base, under its own name or its neighbour's, or zeros (`sources`). So it needs no grown copy
anywhere: `grow` builds one from a base in memory, and a sharded run has each rank read its own
rows of the grown tensors straight from the base's files (training_image.parallel.load_shards).
"""

from __future__ import annotations

import torch

from shared.shapes import ModelConfig, grown_config
from training_image.model import Decoder

_ZEROED = ("attn.o_proj.weight", "mlp.down_proj.weight")  # of an inserted block


def sources(config: ModelConfig) -> dict[str, str | None]:
    """Every parameter name of the grown model -> the base parameter it copies, or None (zeros).
    A tied lm_head is the embedding and has no name of its own."""
    grown = grown_config(config)
    with torch.device("meta"):
        names = [name for name, _ in Decoder(grown).named_parameters()]
    base_ids = set(config.ids())
    copies: dict[str, str] = {}
    neighbour = None
    for block_id in grown.ids():
        if block_id in base_ids:
            neighbour = block_id
        copies[block_id] = neighbour
    out: dict[str, str | None] = {}
    for name in names:
        if not name.startswith("blocks."):
            out[name] = name
            continue
        _, block_id, rest = name.split(".", 2)
        inserted = block_id not in base_ids
        out[name] = None if inserted and rest in _ZEROED else f"blocks.{copies[block_id]}.{rest}"
    return out


@torch.no_grad()
def grow(model: Decoder, config: ModelConfig) -> tuple[Decoder, ModelConfig]:
    """(grown model, its config). The base model is left as it was."""
    new_config = grown_config(config)
    parameter = next(model.parameters())
    grown = Decoder(new_config).to(device=parameter.device, dtype=parameter.dtype)
    base = dict(model.named_parameters())
    targets = dict(grown.named_parameters())
    for name, source in sources(config).items():
        if source is None:
            targets[name].zero_()
        else:
            targets[name].copy_(base[source])
    return grown, new_config
