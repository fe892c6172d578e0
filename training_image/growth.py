"""Growth: LLaMA Pro block expansion (docs/architecture.md §3).

After every 4 blocks of the base (at least once) a new block is inserted, a copy of the block
before it with the attention output projection and the MLP down projection set to zero. A zeroed
output projection makes the new block's residual branches add exactly nothing, so the grown model
computes the same function as the base, and training then puts the new capacity to use.
"""

from __future__ import annotations

import torch

from shared.shapes import ModelConfig, grown_config
from training_image.model import Decoder


@torch.no_grad()
def grow(model: Decoder, config: ModelConfig) -> tuple[Decoder, ModelConfig]:
    """(grown model, its config). The base model is left as it was."""
    new_config = grown_config(config)
    parameter = next(model.parameters())
    grown = Decoder(new_config).to(device=parameter.device, dtype=parameter.dtype)
    grown.embed.load_state_dict(model.embed.state_dict())
    grown.norm.load_state_dict(model.norm.state_dict())
    if not new_config.tie_embeddings:
        grown.lm_head.load_state_dict(model.lm_head.state_dict())
    base_ids = set(config.ids())
    neighbour = None
    for block_id, block in grown.blocks.items():
        if block_id in base_ids:
            neighbour = block_id
            block.load_state_dict(model.blocks[block_id].state_dict())
        else:
            block.load_state_dict(model.blocks[neighbour].state_dict())
            block.attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
    return grown, new_config
