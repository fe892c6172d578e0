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


def head_shapes(shape: LayerShape) -> list[tuple[int, int]]:
    """Every (kv groups kept, query heads kept in each) a layer can shrink to.

    A query head goes alone, and a KV group only with the last of its query heads; the kept
    groups keep equal numbers of heads, which grouped-query attention needs. Of the shapes that
    keep the same number of query heads, contraction uses the one keeping the most groups.
    """
    per_group = shape.n_heads // shape.n_kv_heads
    return [(k, s) for k in range(1, shape.n_kv_heads + 1) for s in range(1, per_group + 1)]


def allot(options: list[dict[int, float]], target: int) -> list[int]:
    """One choice per layer among its {removed count: cost}, totalling `target` (or the nearest
    total the choices reach) at the least summed cost; exact, by dynamic programming."""
    best: dict[int, tuple[float, list[int]]] = {0: (0.0, [])}
    for layer in options:
        step: dict[int, tuple[float, list[int]]] = {}
        for total, (cost, picks) in best.items():
            for removed, c in sorted(layer.items()):
                key, value = total + removed, cost + c
                if key not in step or value < step[key][0]:
                    step[key] = (value, picks + [removed])
        best = step
    total = min(best, key=lambda t: (abs(t - target), best[t][0]))
    return best[total][1]


def even_cuts(layers: list[LayerShape], ratio: float) -> tuple[list[tuple[int, int]], list[int]]:
    """The size a contraction of these layers at `ratio` reaches: each loses round(ratio x F) MLP
    units, and together they lose round(ratio x H) query heads each, spread as evenly as their
    head shapes allow. ((kv groups, heads per group) kept, MLP units removed) per layer."""
    target = sum(heads_to_remove(layer.n_heads, ratio) for layer in layers)
    by_removed = [{layer.n_heads - k * s: (k, s) for k, s in head_shapes(layer)} for layer in layers]  # by k: most groups kept wins
    removed = allot([{r: float(r * r) for r in options} for options in by_removed], target)
    return [options[r] for options, r in zip(by_removed, removed)], [units_to_remove(l.mlp_hidden, ratio) for l in layers]


def contracted_layers(layers: list[LayerShape], ratio: float) -> list[LayerShape]:
    """What even_cuts leaves of each layer."""
    heads, units = even_cuts(layers, ratio)
    return [LayerShape(n_heads=k * s, n_kv_heads=k, mlp_hidden=layer.mlp_hidden - n)
            for layer, (k, s), n in zip(layers, heads, units)]


class LayerChange(BaseModel):
    """Blocks of one shape and what a contraction leaves of them."""

    model_config = ConfigDict(frozen=True)

    count: int
    before: LayerShape
    after: LayerShape


class ContractionForecast(BaseModel):
    """The size a contraction reaches before it runs (the training image's contraction removes the
    same parameters, to within half an MLP unit). Which blocks it prunes depends on the data
    (their influence on a calibration sample): for blocks of different sizes the parameters lie
    between a minimum and a maximum; for equal blocks the two are the same."""

    model_config = ConfigDict(frozen=True)

    parameters_min: int
    parameters_max: int
    depth: int = Field(description="Blocks after contraction: it narrows blocks, it removes none.")
    layers: list[LayerChange] = Field(description="The pruned blocks, by shape, in the smallest outcome.")


def forecast_contraction(config: ModelConfig, ratio: float, num_layers: int) -> ContractionForecast:
    """The outcome of pruning `ratio` of `num_layers` blocks of `config` (the first and last are
    spared while depth allows, as the contraction does)."""
    n = max(1, min(num_layers, config.n_layers))
    interior, ends = config.layers[1:-1], [config.layers[0], config.layers[-1]] if config.n_layers > 1 else config.layers[:1]
    removed = lambda layer: config.layer_parameters(layer) - config.layer_parameters(contracted_layers([layer], ratio)[0])  # noqa: E731
    pool = sorted(interior, key=removed)
    sets = [pool[:n], pool[::-1][:n]]
    if n > len(interior):  # depth forces the ends in
        sets = [interior + ends[: n - len(interior)]] * 2
    outcomes = []
    for chosen in sets:
        after = contracted_layers(chosen, ratio)
        kept = config.parameters() - sum(config.layer_parameters(b) - config.layer_parameters(a) for b, a in zip(chosen, after))
        outcomes.append((kept, chosen, after))
    smallest = min(outcomes, key=lambda o: o[0])
    changes: dict[tuple[LayerShape, LayerShape], int] = {}
    for before, after in zip(smallest[1], smallest[2]):
        changes[(before, after)] = changes.get((before, after), 0) + 1
    return ContractionForecast(
        parameters_min=min(o[0] for o in outcomes), parameters_max=max(o[0] for o in outcomes), depth=config.n_layers,
        layers=[LayerChange(count=c, before=b, after=a) for (b, a), c in changes.items()])


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


def grown_block_ids(config: ModelConfig) -> list[str]:
    """The blocks growth inserted (named after the block they follow: "3_1")."""
    return [bid for bid in config.ids() if "_" in bid]


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


# A healing step takes at most this share of the healing dataset's windows (1 / 8), so one pass
# over a small dataset is at least this many optimizer steps.
HEALING_STEPS_PER_PASS = 8


def healing_batch_size(parameters: int, seq_len: int, windows: int) -> int:
    """Sequences per step of a contract job's healing on `windows` windows: batch_size_for's, or
    fewer where the healing dataset is small, the largest power of two that makes a pass over it
    at least HEALING_STEPS_PER_PASS steps (at least 1).

    Healing distils from the source, a dense signal over the whole vocabulary, so it has less
    use for large batches than training on tokens alone; with a dataset of a few dozen windows
    the number of steps is what heals. Measured on SmolLM2-135M's own blocks at ratio 0.25 on 32
    windows (docs/evaluation.md, 32 steps either way, the same bill): a batch of 16, 16 passes,
    left +1.53% perplexity; a batch of 4, 4 passes, +0.49%."""
    full = batch_size_for(parameters, seq_len)
    fits = max(1, windows // HEALING_STEPS_PER_PASS)
    return min(full, 2 ** int(math.log2(fits)))


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
