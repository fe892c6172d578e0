"""`fusion-train`: make base model directories.

    fusion-train init --size tiny --out DIR [--seed 0]   a fresh, randomly initialised base model
    fusion-train import-hf SRC --out DIR                 a Llama checkpoint in Hugging Face format
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from shared.shapes import SIZES, LayerShape, ModelConfig
from training_image.data import stdlib_corpus
from training_image.model import Decoder
from training_image.modeldir import save_model_dir
from training_image.tokenizer import load_tokenizer, train_tokenizer

TOKENIZER_CORPUS_BYTES = 4_000_000


def init_model_dir(size: str, out: str | Path, seed: int = 0) -> Path:
    """A base model of a named size: tokenizer trained on the Python standard library, random weights."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; one of {', '.join(SIZES)}")
    config = SIZES[size]
    tokenizer = train_tokenizer(stdlib_corpus(TOKENIZER_CORPUS_BYTES), config.vocab_size)
    model = Decoder(config).init_weights(seed)
    return save_model_dir(out, model, tokenizer)


# Hugging Face Llama weight names -> ours; {i} is the layer index (our block id).
HF_LLAMA_NAMES = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
    "model.layers.{i}.input_layernorm.weight": "blocks.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blocks.{i}.attn.q_proj.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blocks.{i}.attn.k_proj.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blocks.{i}.attn.v_proj.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blocks.{i}.attn.o_proj.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blocks.{i}.mlp_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blocks.{i}.mlp.gate_proj.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blocks.{i}.mlp.up_proj.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blocks.{i}.mlp.down_proj.weight",
}


def hf_llama_config(hf: dict) -> ModelConfig:
    """Our ModelConfig for a Hugging Face LlamaConfig dict; refuses what our decoder does not compute."""
    if hf.get("model_type") not in (None, "llama"):
        raise ValueError(f"only Llama checkpoints can be imported, not {hf.get('model_type')!r}")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"rope scaling {rope.get('rope_type', rope.get('type'))!r} is not supported")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("Llama checkpoints with biases are not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"activation {hf['hidden_act']!r} is not supported (SwiGLU uses silu)")
    heads = hf["num_attention_heads"]
    layer = LayerShape(
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        mlp_hidden=hf["intermediate_size"],
    )
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        context_length=hf.get("max_position_embeddings", 2048),
        layers=[layer] * hf["num_hidden_layers"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def hf_llama_state_dict(hf_weights: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    names = {}
    for hf_name, ours in HF_LLAMA_NAMES.items():
        if "{i}" in hf_name:
            names.update({hf_name.format(i=i): ours.format(i=i) for i in range(config.n_layers)})
        else:
            names[hf_name] = ours
    if config.tie_embeddings:
        names.pop("lm_head.weight")
    unknown = sorted(set(hf_weights) - set(names) - {"lm_head.weight"})
    missing = sorted(set(names) - set(hf_weights))
    if unknown or missing:
        raise ValueError(f"weights do not match a Llama of this config: unknown {unknown[:5]}, missing {missing[:5]}")
    state = {ours: hf_weights[hf_name].to(torch.float32) for hf_name, ours in names.items()}
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    return state


def import_hf(src: str | Path, out: str | Path) -> Path:
    """Convert a Hugging Face Llama directory (config.json, *.safetensors, tokenizer.json)."""
    source = Path(src)
    config = hf_llama_config(json.loads((source / "config.json").read_text()))
    weights: dict[str, torch.Tensor] = {}
    files = sorted(source.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {source}")
    for file in files:
        weights.update(load_file(str(file)))
    if not (source / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {source} (a `tokenizers` tokenizer is required)")
    model = Decoder(config)
    model.load_state_dict(hf_llama_state_dict(weights, config))
    return save_model_dir(out, model, load_tokenizer(source / "tokenizer.json"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fusion-train", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    init = commands.add_parser("init", help="write a fresh base model directory")
    init.add_argument("--size", required=True, choices=sorted(SIZES))
    init.add_argument("--out", required=True)
    init.add_argument("--seed", type=int, default=0)
    imp = commands.add_parser("import-hf", help="convert a Hugging Face Llama checkpoint")
    imp.add_argument("src")
    imp.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.command == "init":
        path = init_model_dir(args.size, args.out, args.seed)
    else:
        path = import_hf(args.src, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
