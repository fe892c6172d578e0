"""Model shapes: the one definition of a Fusion decoder's size.

The training image builds its modules from a `ModelConfig`; the API prices jobs and checks
settings against the same object (read from a model's `config.json` in the catalog). Every
layer carries its own attention and MLP sizes so contraction can shrink layers one by one,
and growth can insert copies of a neighbour.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

GROWTH_INTERVAL = 4  # one new block after every 4 existing ones (LLaMA Pro block expansion)


class LayerShape(BaseModel):
    """Sizes of one decoder block. n_heads is a multiple of n_kv_heads (grouped-query attention)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_heads: Annotated[int, Field(ge=1)]
    n_kv_heads: Annotated[int, Field(ge=1)]
    mlp_hidden: Annotated[int, Field(ge=1)]

    @model_validator(mode="after")
    def _groups_divide(self) -> "LayerShape":
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        return self


class RopeScaling(BaseModel):
    """Stretched rotary frequencies, as the source checkpoint trained them.

    linear: every frequency divided by `factor`. llama3 (Llama 3.1+): wavelengths longer than
    original_context_length / low_freq_factor are divided by `factor`, shorter than
    original_context_length / high_freq_factor kept, and the band between interpolated smoothly.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["linear", "llama3"]
    factor: Annotated[float, Field(gt=0)]
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context_length: Annotated[int, Field(ge=1)] | None = None


# Architectures a model can be written out as (the Hugging Face model_type): they share one
# block layout and differ only in the optional features below.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
DTYPES = ("float32", "bfloat16", "float16")


class ModelConfig(BaseModel):
    """The exact shape of a model; serialized as the model directory's `config.json`."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: Annotated[int, Field(ge=1)]
    dim: Annotated[int, Field(ge=1)]
    head_dim: Annotated[int, Field(ge=1)]
    context_length: Annotated[int, Field(ge=1)]
    layers: list[LayerShape] = Field(min_length=1)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2)
    qk_norm: bool = False  # an RMSNorm over each head's queries and keys before rotary (Qwen3)
    family: Literal[FAMILIES] = "llama"  # the architecture exported models are written as
    dtype: Literal[DTYPES] = "float32"  # of the weights stored in a model directory; training runs in fp32
    # Stable names of the blocks in order ("0".."N-1"; a block grown after "3" is "3_1"), so a
    # surgery that inserts or removes a block never renames the weights of the others.
    block_ids: list[str] | None = None

    @model_validator(mode="after")
    def _block_ids_match(self) -> "ModelConfig":
        if self.block_ids is not None and (
            len(self.block_ids) != len(self.layers) or len(set(self.block_ids)) != len(self.block_ids)
        ):
            raise ValueError(f"block_ids must name each of the {len(self.layers)} layers once")
        return self

    @classmethod
    def uniform(
        cls,
        *,
        vocab_size: int,
        dim: int,
        n_layers: int,
        n_heads: int,
        n_kv_heads: int,
        mlp_hidden: int,
        context_length: int,
        **extra,
    ) -> "ModelConfig":
        layer = LayerShape(n_heads=n_heads, n_kv_heads=n_kv_heads, mlp_hidden=mlp_hidden)
        return cls(
            vocab_size=vocab_size,
            dim=dim,
            head_dim=dim // n_heads,
            context_length=context_length,
            layers=[layer] * n_layers,
            **extra,
        )

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def ids(self) -> list[str]:
        return list(self.block_ids) if self.block_ids is not None else [str(i) for i in range(self.n_layers)]

    def layer_parameters(self, layer: LayerShape) -> int:
        d, hd = self.dim, self.head_dim
        attention = d * layer.n_heads * hd + 2 * d * layer.n_kv_heads * hd + layer.n_heads * hd * d
        if self.qkv_bias:
            attention += (layer.n_heads + 2 * layer.n_kv_heads) * hd
        if self.qk_norm:
            attention += 2 * hd
        mlp = 3 * d * layer.mlp_hidden  # gate, up, down (SwiGLU)
        norms = 2 * d
        return attention + mlp + norms

    def parameters(self) -> int:
        """Exact parameter count of the model this config describes."""
        embeddings = self.vocab_size * self.dim
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return embeddings + head + self.dim + sum(self.layer_parameters(l) for l in self.layers)


def units_to_remove(mlp_hidden: int, ratio: float) -> int:
    """MLP units one contracted layer loses at `ratio`: round(ratio x F), leaving at least 1."""
    return min(round(ratio * mlp_hidden), mlp_hidden - 1)


def heads_to_remove(n_heads: int, ratio: float) -> int:
    """Query heads one contracted layer loses at `ratio`: round(ratio x H), at least 1 when ratio > 0,
    leaving at least 1."""
    if ratio <= 0:
        return 0
    return min(max(1, round(ratio * n_heads)), n_heads - 1)


def contraction_floor(config: ModelConfig, ratio: float, num_layers: int) -> tuple[int, int]:
    """(layers that can still lose anything, layers that can lose all `ratio` asks of them): a
    layer keeps at least 1 query head and 1 MLP unit, so a model contracted again and again reaches
    a floor where a contraction removes less than asked, then nothing."""
    can_lose = full = 0
    for layer in config.layers:
        units, heads = units_to_remove(layer.mlp_hidden, ratio), heads_to_remove(layer.n_heads, ratio)
        can_lose += bool(units or heads)
        full += units == round(ratio * layer.mlp_hidden) and heads == max(1, round(ratio * layer.n_heads))
    return can_lose, full


def growth_positions(n_layers: int) -> list[int]:
    """Indices (in the base model) of the blocks that each get a copy inserted right after them.

    One after every GROWTH_INTERVAL blocks, and at least one: a 2-block model grows after block 1.
    """
    count = max(1, n_layers // GROWTH_INTERVAL)
    if n_layers < GROWTH_INTERVAL:
        return [n_layers - 1]
    return [(i + 1) * GROWTH_INTERVAL - 1 for i in range(count)]


def grown_config(config: ModelConfig) -> ModelConfig:
    """The config after block expansion: each inserted block has its neighbour's shape."""
    after = set(growth_positions(config.n_layers))
    layers: list[LayerShape] = []
    ids: list[str] = []
    for i, (layer, bid) in enumerate(zip(config.layers, config.ids())):
        layers.append(layer)
        ids.append(bid)
        if i in after:
            layers.append(layer)
            ids.append(_next_free_id(bid, set(config.ids()) | set(ids)))
    return config.model_copy(update={"layers": layers, "block_ids": ids})


def _next_free_id(bid: str, taken: set[str]) -> str:
    n = 1
    while f"{bid}_{n}" in taken:
        n += 1
    return f"{bid}_{n}"


def growth_parameters(config: ModelConfig) -> int:
    """Parameters that growth adds to this base: what the growth fee prices."""
    return grown_config(config).parameters() - config.parameters()


# A step's batch is sized in tokens, by the model's size: REFERENCE_SEQ_LEN tokens for each 10M
# parameters, in powers of two (16,384 at 640M parameters, 2,097,152 at 70B), as the batches of
# published recipes grow with the model (about 0.5M tokens at 125M to 2-4M at 7-70B when
# pretraining from scratch; a job here continues from a trained base on the customer's data,
# and starts lower). Capped at BATCH_TOKENS_CAP: past the critical batch size a larger batch
# buys no quality for its compute. At least MIN_BATCH_SEQUENCES sequences a step, however long:
# fewer, and a step's gradient is one or two documents' noise.
REFERENCE_SEQ_LEN = 256
MIN_BATCH_SEQUENCES = 8
BATCH_TOKENS_CAP = 4 * 1024 * 1024


def batch_tokens_for(parameters: int) -> float:
    """Tokens per optimizer step the model's size asks for, before MIN_BATCH_SEQUENCES: a power of
    two times REFERENCE_SEQ_LEN, at most BATCH_TOKENS_CAP (below 1 x REFERENCE_SEQ_LEN for models
    under 7M parameters, which the minimum of sequences then sets)."""
    return min(BATCH_TOKENS_CAP, REFERENCE_SEQ_LEN * 2.0 ** round(math.log2(max(parameters, 1) / 1e7)))


def batch_size_for(parameters: int, seq_len: int = REFERENCE_SEQ_LEN) -> int:
    """Sequences per optimizer step: batch_tokens_for's tokens in sequences of seq_len, a power
    of two (so that it splits over 1, 2, 4 or 8 GPUs a node), at least MIN_BATCH_SEQUENCES. At
    seq_len 256: 8 up to 80M parameters, doubling with size, 8,192 at 70B.

    A rule rather than a setting: the public settings fix steps and seq_len only, and the billed
    token count is steps x seq_len (docs/architecture.md §5) whatever this batch is. The trainer
    runs this batch and the ETA prices its compute, so both read it from here.
    """
    sequences = 2 ** round(math.log2(batch_tokens_for(parameters) / max(seq_len, 1)))
    return int(max(MIN_BATCH_SEQUENCES, sequences))


# Named sizes. `debug` trains in seconds on a CPU; `tiny` is the local demo's base (deep enough
# for the default 8-layer contraction); the rest are GPU shapes up to the 1B class.
SIZES: dict[str, ModelConfig] = {
    "debug": ModelConfig.uniform(
        vocab_size=512, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, mlp_hidden=172, context_length=512
    ),
    "tiny": ModelConfig.uniform(
        vocab_size=2048, dim=128, n_layers=12, n_heads=4, n_kv_heads=2, mlp_hidden=352, context_length=1024
    ),
    "small": ModelConfig.uniform(
        vocab_size=32768, dim=768, n_layers=12, n_heads=12, n_kv_heads=4, mlp_hidden=2048, context_length=2048
    ),
    "medium": ModelConfig.uniform(
        vocab_size=32768, dim=1024, n_layers=24, n_heads=16, n_kv_heads=8, mlp_hidden=2816, context_length=2048
    ),
    "large": ModelConfig.uniform(
        vocab_size=32768, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, mlp_hidden=5632, context_length=4096
    ),
}
