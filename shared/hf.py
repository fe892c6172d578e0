"""Hugging Face checkpoints of the families our decoder computes: config and tensor names.

Pure Python (no torch), so the API can check a tenant's folder from `config.json` and the
safetensors headers alone, and the training image converts with the same tables.

Llama (1, 2, 3.x, SmolLM2, TinyLlama), Mistral, Qwen2/2.5 and Qwen3 share one block: RMSNorm,
rotary attention with grouped kv heads, a SwiGLU MLP. What differs is a config field of ours:
Qwen2 has biases on q/k/v, Qwen3 an RMSNorm over each head's queries and keys, Llama 3.1+ stretched
rotary frequencies (rope type llama3), Llama 3.2 and SmolLM2 tied embeddings. Anything else the
decoder does not compute is refused with a message naming it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

from shared.shapes import DTYPES, FAMILIES, LayerShape, ModelConfig, RopeScaling

EXPORT_DIR = "hf"  # the transformers folder inside a job's model directory (its S3 prefix, or an archive)
# A deploy unpacks EXPORT_DIR of an archive into this prefix beside it, and writes the manifest last.
EXPORT_MANIFEST_SUFFIX = ".manifest.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
HEADER_LIMIT = 100 * 1024 * 1024
MAX_LAYERS = 1024  # far above any open-weight family; bounds the work a claimed config can cause  # a safetensors header larger than this is not a checkpoint

# safetensors dtype names <-> ours; a checkpoint in any other dtype is refused.
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def export_prefix(archive_key: str) -> str:
    """Key prefix of the transformers folder a deploy unpacks beside the archive `archive_key`."""
    return (archive_key.rsplit("/", 1)[0] + "/" if "/" in archive_key else "") + EXPORT_DIR + "/"


def export_manifest(prefix: str) -> str:
    """Key of the manifest of the unpacked folder at `prefix`: its files and sizes, written last."""
    return prefix.rstrip("/") + EXPORT_MANIFEST_SUFFIX


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str  # the transformers class an export names in config.json
    qkv_bias: bool | None  # fixed by the architecture (Qwen2), or None: from attention_bias
    qk_norm: bool


FAMILY = {
    "llama": Family("llama", "LlamaForCausalLM", None, False),
    "mistral": Family("mistral", "MistralForCausalLM", False, False),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", True, False),
    "qwen3": Family("qwen3", "Qwen3ForCausalLM", None, True),
}
assert tuple(FAMILY) == FAMILIES

_MOE_KEYS = ("num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size", "n_routed_experts")


class UnsupportedCheckpoint(ValueError):
    """The checkpoint is well formed but uses something our decoder does not compute."""


def model_config_from_hf(hf: dict[str, Any], dtype: str = "float32") -> ModelConfig:
    """Our ModelConfig for a Hugging Face config.json; refuses what the decoder does not compute."""
    model_type = hf.get("model_type", "llama")
    if any(hf.get(key) for key in _MOE_KEYS) or "moe" in str(model_type):
        raise UnsupportedCheckpoint(f"mixture-of-experts models ({model_type!r}) are not supported")
    if model_type not in FAMILY:
        raise UnsupportedCheckpoint(f"model type {model_type!r} is not supported; one of {', '.join(FAMILIES)}")
    family = FAMILY[model_type]
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedCheckpoint(f"activation {hf['hidden_act']!r} is not supported (the MLP is SwiGLU with silu)")
    if hf.get("mlp_bias"):
        raise UnsupportedCheckpoint("mlp_bias (biases in the MLP) is not supported")
    if family.qkv_bias is None and hf.get("attention_bias"):
        raise UnsupportedCheckpoint("attention_bias (a bias on o_proj as well as q/k/v) is not supported")
    context = int(hf.get("max_position_embeddings", 2048))
    _refuse_sliding_window(hf, family, context)
    if not 1 <= int(hf["num_hidden_layers"]) <= MAX_LAYERS:
        raise UnsupportedCheckpoint(f"num_hidden_layers={hf['num_hidden_layers']} is outside 1..{MAX_LAYERS}")
    heads = int(hf["num_attention_heads"])
    layer = LayerShape(
        n_heads=heads, n_kv_heads=int(hf.get("num_key_value_heads") or heads), mlp_hidden=int(hf["intermediate_size"])
    )
    theta, scaling = _rope(hf)
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        dim=int(hf["hidden_size"]),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        context_length=context,
        layers=[layer] * int(hf["num_hidden_layers"]),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=family.qkv_bias if family.qkv_bias is not None else False,
        qk_norm=family.qk_norm,
        family=model_type,
        dtype=dtype,
    )


def _refuse_sliding_window(hf: dict[str, Any], family: Family, context: int) -> None:
    if family.model_type in ("qwen2", "qwen3"):
        sliding = "sliding_attention" in (hf.get("layer_types") or []) or bool(hf.get("use_sliding_window"))
        window = hf.get("sliding_window")
    else:
        window = hf.get("sliding_window")
        sliding = window is not None
    if sliding and (window is None or int(window) < context):
        raise UnsupportedCheckpoint(
            f"sliding-window attention ({window} tokens) shorter than the context ({context}) is not supported"
        )


def _rope(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if rope and set(rope) <= {"full_attention", "sliding_attention"}:
        raise UnsupportedCheckpoint("rotary parameters per layer type are not supported")
    kind = rope.get("rope_type", rope.get("type", "default"))
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
        raise UnsupportedCheckpoint("partial rotary embeddings (partial_rotary_factor) are not supported")
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, RopeScaling(type="linear", factor=float(rope["factor"]))
    if kind == "llama3":
        return theta, RopeScaling(
            type="llama3",
            factor=float(rope["factor"]),
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_context_length=int(rope["original_max_position_embeddings"]),
        )
    raise UnsupportedCheckpoint(f"rope scaling {kind!r} is not supported; default, linear or llama3")


# ----------------------------------------------------------------------------- tensor names

# Our per-block parameter name -> the Hugging Face name inside model.layers.{i}.
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "attn.q_proj.bias": "self_attn.q_proj.bias",
    "attn.k_proj.bias": "self_attn.k_proj.bias",
    "attn.v_proj.bias": "self_attn.v_proj.bias",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}


def tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every stored tensor of the model, by our name, with its shape (lm_head absent when tied)."""
    d, hd = config.dim, config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (config.vocab_size, d), "norm.weight": (d,)}
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, d)
    for bid, layer in zip(config.ids(), config.layers):
        q, kv, f = layer.n_heads * hd, layer.n_kv_heads * hd, layer.mlp_hidden
        block = {
            "attn_norm.weight": (d,), "attn.q_proj.weight": (q, d), "attn.k_proj.weight": (kv, d),
            "attn.v_proj.weight": (kv, d), "attn.o_proj.weight": (d, q), "mlp_norm.weight": (d,),
            "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f),
        }
        if config.qkv_bias:
            block.update({"attn.q_proj.bias": (q,), "attn.k_proj.bias": (kv,), "attn.v_proj.bias": (kv,)})
        if config.qk_norm:
            block.update({"attn.q_norm.weight": (hd,), "attn.k_norm.weight": (hd,)})
        shapes.update({f"blocks.{bid}.{name}": shape for name, shape in block.items()})
    return shapes


def hf_names(config: ModelConfig) -> dict[str, str]:
    """Our tensor name -> the Hugging Face one; blocks are numbered in model order."""
    names = {}
    index = {bid: i for i, bid in enumerate(config.ids())}
    for ours in tensor_shapes(config):
        if ours in _TOP_NAMES:
            names[ours] = _TOP_NAMES[ours]
        else:
            _, bid, rest = ours.split(".", 2)
            names[ours] = f"model.layers.{index[bid]}.{_BLOCK_NAMES[rest]}"
    return names


def padded_config(config: ModelConfig) -> ModelConfig:
    """The uniform config an export is written as: every layer as wide as the widest.

    Contraction may remove query heads within a kv group, so layers differ in queries per kv
    head too: the export gives every layer the most kv heads of any layer and the most queries
    per kv head of any layer (each layer's heads sit in their own group's slots, see
    training_image.export)."""
    groups = max(l.n_kv_heads for l in config.layers)
    per_group = max(l.n_heads // l.n_kv_heads for l in config.layers)
    layer = LayerShape(
        n_heads=groups * per_group,
        n_kv_heads=groups,
        mlp_hidden=max(l.mlp_hidden for l in config.layers),
    )
    return config.model_copy(update={"layers": [layer] * config.n_layers, "block_ids": None})


def hf_config(config: ModelConfig, bos_token_id: int | None, eos_token_id: int | list[int] | None) -> dict[str, Any]:
    """config.json of the family's transformers class for a uniform config (see padded_config)."""
    layer = config.layers[0]
    if any(l != layer for l in config.layers):
        raise ValueError("a Hugging Face config needs every layer alike; pad the model first")
    family = FAMILY[config.family]
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        rope.update(rope_type=config.rope_scaling.type, factor=config.rope_scaling.factor)
        if config.rope_scaling.type == "llama3":
            rope.update(
                low_freq_factor=config.rope_scaling.low_freq_factor,
                high_freq_factor=config.rope_scaling.high_freq_factor,
                original_max_position_embeddings=config.rope_scaling.original_context_length or config.context_length,
            )
    out: dict[str, Any] = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": layer.mlp_hidden,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": layer.n_heads,
        "num_key_value_heads": layer.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.context_length,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": rope,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "dtype": config.dtype,
        "use_cache": True,
    }
    if family.qkv_bias is None:
        out["attention_bias"] = config.qkv_bias
    if config.family == "llama":
        out["mlp_bias"] = False
    if config.family == "mistral":
        out["sliding_window"] = None
    if config.family in ("qwen2", "qwen3"):
        out.update(use_sliding_window=False, sliding_window=None)
    return out


# ----------------------------------------------------------------------------- safetensors headers


def parse_header(prefix: bytes) -> tuple[int, dict[str, Any] | None]:
    """(header length, header) from the first bytes of a safetensors file; the header is None
    when `prefix` is shorter than 8 + its length (read that many bytes and call again)."""
    if len(prefix) < 8:
        raise ValueError("not a safetensors file: shorter than its 8-byte header length")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > HEADER_LIMIT:
        raise ValueError(f"not a safetensors file: a header of {length} bytes")
    if len(prefix) < 8 + length:
        return length, None
    try:
        header = json.loads(prefix[8 : 8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("not a safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file: its header is not a JSON object")
    return length, header


def check_tensors(config: ModelConfig, headers: dict[str, dict[str, Any]]) -> str:
    """The checkpoint's one dtype, after checking every expected tensor is present with its shape.

    `headers` maps each shard's file name to its parsed header. A tied checkpoint may still
    carry lm_head.weight (some writers keep the duplicate); it is ignored."""
    found: dict[str, dict[str, Any]] = {}
    for header in headers.values():
        found.update({name: info for name, info in header.items() if name != "__metadata__"})
    shapes = tensor_shapes(config)
    expected = {hf: shapes[ours] for ours, hf in hf_names(config).items()}
    missing = sorted(set(expected) - set(found))
    if missing:
        raise UnsupportedCheckpoint(f"missing tensors: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    unknown = sorted(set(found) - set(expected) - {"lm_head.weight"})
    if unknown:
        raise UnsupportedCheckpoint(f"tensors the architecture does not have: {', '.join(unknown[:5])}")
    dtypes = set()
    for name, shape in expected.items():
        info = found[name]
        if tuple(info.get("shape", ())) != shape:
            raise UnsupportedCheckpoint(f"tensor {name} has shape {info.get('shape')}, expected {list(shape)}")
        dtypes.add(info.get("dtype"))
    unsupported = dtypes - set(SAFETENSORS_DTYPES)
    if unsupported:
        raise UnsupportedCheckpoint(f"tensor dtype {sorted(unsupported)[0]} is not supported; one of F32, BF16, F16")
    if len(dtypes) > 1:
        raise UnsupportedCheckpoint(f"tensors mix dtypes {sorted(dtypes)}")
    dtype = SAFETENSORS_DTYPES[dtypes.pop()]
    assert dtype in DTYPES
    return dtype


def shard_files(index: dict[str, Any] | None) -> list[str]:
    """The shard file names an index lists (a single model.safetensors without one)."""
    if index is None:
        return [SINGLE]
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{INDEX} has no weight_map")
    return sorted(set(weight_map.values()))
