"""Export: a model as a folder transformers loads (`AutoModelForCausalLM.from_pretrained`).

The folder holds config.json of the family's class (LlamaForCausalLM, MistralForCausalLM,
Qwen2ForCausalLM, Qwen3ForCausalLM), safetensors shards with their index, tokenizer.json,
tokenizer_config.json, generation_config.json, and the chat template conversations were rendered
with (the model's own, or the default one: training_image.tokenizer) twice: as chat_template.jinja,
which transformers 5 reads, and in tokenizer_config.json, where the LLM serving container (TGI)
and older transformers read it.

A transformers config gives every layer the same sizes, but a contracted model has its own per
layer. The export pads each narrower layer with zeros up to the widest: extra query heads (in
their kv group's slots, so each query still reads its own kv head) with zero q rows and zero
o_proj columns, extra kv heads with zero k/v rows, extra MLP units with zero
gate/up rows and down_proj columns (biases zero too). A zero o_proj column and a zero down_proj
column add nothing to the residual stream, so the padded model computes exactly the same logits;
it is only as large as the uncontracted one. The compact per-layer model directory stays the
catalog's artifact (what further jobs train and contract); the export is for running it elsewhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from shared.hf import EXPORT_DIR, hf_config, hf_names, padded_config, tensor_shapes
from shared.shapes import ModelConfig
from training_image.model import Decoder
from training_image.shards import SHARD_BYTES, write_shards
from training_image.tokenizer import CHAT_TEMPLATE, GENERATION_CONFIG, TOKENIZER_CONFIG, TextTokenizer, as_text_tokenizer


def padded_state(config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face name -> tensor of the model padded to its widest layer, in the config's dtype."""
    wide = padded_config(config)
    wide_names, wide_shapes = hf_names(wide), tensor_shapes(wide)
    dtype = getattr(torch, config.dtype)
    # Block i of the model is block i of the uniform config, whatever its stable id.
    position = {bid: str(i) for i, bid in enumerate(config.ids())}
    shapes = dict(zip(config.ids(), config.layers))
    out: dict[str, torch.Tensor] = {}
    for name in tensor_shapes(config):
        tensor = state[name].detach().to("cpu", dtype)
        wide_name = name if not name.startswith("blocks.") else _rename_block(name, position)
        shape = wide_shapes[wide_name]
        if tuple(tensor.shape) != shape:
            padded = torch.zeros(shape, dtype=dtype)
            slots = _query_slots(name, shapes, wide, config.head_dim)
            if slots is None:
                padded[tuple(slice(0, n) for n in tensor.shape)] = tensor  # new rows/columns go last
            elif name.endswith("o_proj.weight"):
                padded[:, slots] = tensor
            else:
                padded[slots] = tensor
            tensor = padded
        out[wide_names[wide_name]] = tensor.contiguous()
    return out


def _query_slots(name: str, shapes, wide: ModelConfig, head_dim: int) -> torch.Tensor | None:
    """Where a layer's query rows (q_proj) or columns (o_proj) go in the padded layer, or None
    for a tensor padded at its end. Query head h reads kv head h // (heads per group): a layer
    with fewer queries per group than the export puts each group's queries in that group's
    first slots, so every query still reads its own kv head."""
    if not name.startswith("blocks.") or not name.endswith(("attn.q_proj.weight", "attn.q_proj.bias", "attn.o_proj.weight")):
        return None
    layer = shapes[name.split(".", 2)[1]]
    per_group, wide_per_group = layer.n_heads // layer.n_kv_heads, wide.layers[0].n_heads // wide.layers[0].n_kv_heads
    heads = [g * wide_per_group + j for g in range(layer.n_kv_heads) for j in range(per_group)]
    return torch.tensor([h * head_dim + d for h in heads for d in range(head_dim)])


def _rename_block(name: str, position: dict[str, str]) -> str:
    _, bid, rest = name.split(".", 2)
    return f"blocks.{position[bid]}.{rest}"


def export_hf(model: Decoder, tokenizer, out: str | Path, shard_bytes: int = SHARD_BYTES) -> Path:
    """Write the transformers folder of `model` to `out` (created or overwritten)."""
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    text = as_text_tokenizer(tokenizer)
    config = model.config
    tensors = padded_state(config, model.state_dict())
    write_shards(tensors, target, shard_bytes)
    eos = text.generation.get("eos_token_id", text.eos_id) if text.generation else text.eos_id
    hf = hf_config(padded_config(config), text.bos_id, eos)
    for key in ("pad_token", "unk_token"):  # transformers pads and maps unknown text with these
        if text.special_id(key) is not None:
            hf[f"{key}_id"] = text.special_id(key)
    (target / "config.json").write_text(json.dumps(hf, indent=2))
    text.save(target / "tokenizer.json")
    (target / CHAT_TEMPLATE).write_text(text.template, encoding="utf-8")
    tokenizer_config = {**text.config, "chat_template": text.template}
    (target / TOKENIZER_CONFIG).write_text(json.dumps(tokenizer_config, indent=2))
    if text.generation is None:
        generation = {"bos_token_id": text.bos_id, "eos_token_id": text.eos_id}
        (target / GENERATION_CONFIG).write_text(json.dumps(generation, indent=2))
    return target
