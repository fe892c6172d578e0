"""The memory plan: how a training job fits on GPUs, by arithmetic alone (no torch).

For a model shape, a sequence length and the batch the trainer runs, this counts the bytes one
GPU holds — weights, gradients, optimizer state, activations, the loss's logits and the working
buffers of the sharding strategy — and from that picks the instance type and count, the strategy
(DDP where a full replica fits, FSDP otherwise), the micro-batch and whether blocks recompute
their activations in the backward pass (activation checkpointing).

The activation counts are exact for `training_image.model.Decoder`: they are the bytes autograd
saves for the backward pass, counted tensor by tensor, and a test measures them with
`torch.autograd.graph.saved_tensors_hooks` against these formulas, in fp32 and under bf16
autocast. What is assumed rather than counted is the headroom for the CUDA context, NCCL's
buffers and allocator fragmentation (`RESERVE_BYTES`, `USABLE_FRACTION`).

Training keeps fp32 master weights, fp32 gradients and AdamW's two fp32 moments: 16 bytes a
parameter, plus the bf16 copy of each weight that autocast makes for the matmuls (2 bytes,
kept for the backward pass). DDP holds all of it on every GPU; FSDP shards the fp32 state over
the ranks and gathers one unit (a block, or the embeddings and head) at a time in bf16.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.shapes import LayerShape, ModelConfig

GIB = 1 << 30

# The bf16 copy autocast makes of each weight a matmul reads, saved for the backward pass.
AUTOCAST_WEIGHT_BYTES = 2
COMPUTE_BYTES = 2  # bf16 activations under autocast
RESIDUAL_BYTES = 4  # the residual stream and the norms stay fp32
INDEX_BYTES = 8  # int64 token ids (embedding input) and targets (loss)
# Targets that the loss does not score (PyTorch's cross_entropy convention).
IGNORE_INDEX = -100
# The loss computes the logits of this many bytes (fp32) of tokens at a time: 256 MiB is 523
# tokens of a 128k vocabulary, and whole micro-batches of a small one.
LOSS_CHUNK_BYTES = 256 << 20
# Headroom that is not counted: the CUDA context and cuBLAS workspaces, NCCL's buffers, and what
# the caching allocator loses to fragmentation. An assumption, not a measurement.
RESERVE_BYTES = 2 * GIB
USABLE_FRACTION = 0.92
# FSDP prefetches the next unit while the current one computes: two gathered units at a time.
FSDP_UNITS_IN_FLIGHT = 2

Strategy = Literal["ddp", "fsdp"]


class Instance(BaseModel):
    """One instance type as the plan sees it: its GPUs and the memory of each."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    gpus: int
    gpu_memory_bytes: int

    @property
    def usable_bytes(self) -> int:
        return int(self.gpu_memory_bytes * USABLE_FRACTION) - RESERVE_BYTES


class MemoryBreakdown(BaseModel):
    """Bytes one GPU holds at its peak, by what holds them."""

    model_config = ConfigDict(frozen=True)

    weights: int  # fp32 master weights (this rank's shard under FSDP)
    gradients: int
    optimizer: int
    autocast_weights: int  # bf16 weight copies (DDP: all of them; FSDP: within working)
    working: int  # FSDP: gathered bf16 units and their unsharded gradients
    activations: int  # saved for the backward pass, over all blocks
    recompute: int  # one block's activations rebuilt in the backward pass (checkpointing)
    logits: int  # the loss's transient peak: one chunk of logits and the head's weight gradient
    # FSDP with its gradient sync deferred to a step's last micro-batch: every unit's whole fp32
    # gradient, held across the micro-batches (FSDP2 accumulates them unsharded).
    whole_gradients: int = 0

    @property
    def total(self) -> int:
        return (
            self.weights + self.gradients + self.optimizer + self.autocast_weights + self.working
            + self.activations + self.recompute + self.logits + self.whole_gradients
        )


class MemoryPlan(BaseModel):
    """How a job runs: where, how sharded, in what micro-batches, with what per GPU."""

    model_config = ConfigDict(frozen=True)

    instance_type: str
    instance_count: int
    world_size: int
    strategy: Strategy
    micro_batch: int  # sequences per forward/backward on one GPU
    activation_checkpointing: bool
    per_gpu: MemoryBreakdown
    gpu_usable_bytes: int
    defer_gradient_sync: bool = False
    batch_size: int | None = None  # sequences per step over all ranks, as planned

    def layout(self) -> Layout:
        return Layout(
            strategy=self.strategy, micro_batch=self.micro_batch, activation_checkpointing=self.activation_checkpointing,
            defer_gradient_sync=self.defer_gradient_sync,
        )

    @property
    def micro_batches(self) -> int:
        """Forward and backward passes a rank runs per optimizer step."""
        return max(1, (self.batch_size or self.world_size * self.micro_batch) // self.world_size // self.micro_batch)


class Layout(BaseModel):
    """How the trainer runs a job, as the plan chose it: what the launcher hands the container
    beside the job's settings (as hyperparameters, every value a string)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: Strategy = "ddp"
    micro_batch: int | None = Field(default=None, ge=1)  # None: a rank's whole share at once
    activation_checkpointing: bool = False
    # Gradients synchronised once a step, on its last micro-batch. DDP always does (its
    # gradients are whole anyway); FSDP does when this is set, at the cost of whole gradients
    # (MemoryBreakdown.whole_gradients), and otherwise reduce-scatters every micro-batch.
    defer_gradient_sync: bool = False

    def hyperparameters(self) -> dict[str, str]:
        return {key: value if isinstance(value, str) else json.dumps(value)
                for key, value in self.model_dump(exclude_none=True).items()}

    @classmethod
    def split(cls, hyperparameters: dict[str, Any]) -> tuple["Layout", dict[str, Any]]:
        """(the layout, the other hyperparameters): a job launched before plans has the defaults."""
        rest = dict(hyperparameters)
        mine = {key: rest.pop(key) for key in cls.model_fields if key in rest}
        return cls.model_validate(mine), rest


class DoesNotFit(ValueError):
    """No instance the plan may use holds the job."""


def block_activation_bytes(config: ModelConfig, layer: LayerShape, compute_bytes: int = COMPUTE_BYTES) -> int:
    """Bytes a block saves for its backward pass, per token.

    Tensor by tensor (C model dim, H query heads, K kv heads, D head dim, M MLP width; `a` the
    compute dtype's bytes): each RMSNorm keeps its fp32 normalised input and the reciprocal rms
    (C*4 + 4, twice); the q, k and v matmuls their one shared input (C*a: the norm casts it once
    to the compute dtype); rotary attention keeps the rotated q and k ((H+K)*D*a) and v (K*D*a);
    attention its output and fp32 log-sum-exp (H*D*a + H*4); the output projection its input
    (H*D*a); the MLP the shared input of gate and up (C*a), and gate, silu, up and their product
    (4*M*a). No weight-sized tensor: each matmul keeps its weight itself (a parameter).
    """
    a, C, D = compute_bytes, config.dim, config.head_dim
    H, K, M = layer.n_heads, layer.n_kv_heads, layer.mlp_hidden
    norms = 2 * (C * RESIDUAL_BYTES + 4)
    attention = C * a + (H + K) * D * a + K * D * a + H * D * a + H * 4 + H * D * a
    return norms + attention + C * a + 4 * M * a


def head_activation_bytes(config: ModelConfig, compute_bytes: int = COMPUTE_BYTES) -> int:
    """Bytes saved per token outside the blocks: token ids and targets, the final norm, and what
    the chunked loss keeps: its input (the head's) and each token's fp32 log-sum-exp. No logits."""
    C = config.dim
    return INDEX_BYTES * 2 + C * RESIDUAL_BYTES + 4 + C * compute_bytes + 4


def loss_chunk_tokens(vocab_size: int) -> int:
    """Tokens whose logits the loss computes at once: LOSS_CHUNK_BYTES of fp32 logits."""
    return max(1, LOSS_CHUNK_BYTES // (4 * vocab_size))


def logits_peak_bytes(config: ModelConfig, tokens: int, compute_bytes: int = COMPUTE_BYTES) -> int:
    """The loss's transient peak for a micro-batch of `tokens` tokens: one chunk's logits in the
    compute dtype, their fp32 copy and one more fp32 tensor of that size (the log-sum-exp's
    exponentials forward, the logits' gradient backward); and the head's weight gradient,
    summed over the chunks in fp32 (with each chunk's share in the compute dtype when that is
    not fp32). Bounded whatever the micro-batch: it no longer grows with the tokens."""
    V, C, a = config.vocab_size, config.dim, compute_bytes
    chunk = min(tokens, loss_chunk_tokens(V))
    weight_gradient = V * C * 4 + (V * C * a if a != 4 else 0)
    return chunk * V * (a + 4 + 4) + weight_gradient


def activation_bytes(config: ModelConfig, tokens: int, checkpointing: bool) -> tuple[int, int, int]:
    """(saved activations, recompute peak, logits peak) for `tokens` tokens in one micro-batch.

    Checkpointing keeps only each block's fp32 input and rebuilds one block at a time in the
    backward pass, so the largest block's activations come back once.
    """
    if checkpointing:
        blocks = config.n_layers * config.dim * RESIDUAL_BYTES
        recompute = max(block_activation_bytes(config, layer) for layer in config.layers)
    else:
        blocks = sum(block_activation_bytes(config, layer) for layer in config.layers)
        recompute = 0
    saved = blocks + head_activation_bytes(config)
    return saved * tokens, recompute * tokens, logits_peak_bytes(config, tokens)


def _unit_parameters(config: ModelConfig) -> list[int]:
    """Parameters of each FSDP unit: every block, the embeddings, and the final norm with the
    head (one unit with the embeddings when they are tied: a parameter lives in one unit)."""
    embed, head = config.vocab_size * config.dim, config.vocab_size * config.dim + config.dim
    outer = [embed + config.dim] if config.tie_embeddings else [embed, head]
    return outer + [config.layer_parameters(layer) for layer in config.layers]


def bytes_per_gpu(
    config: ModelConfig,
    *,
    seq_len: int,
    micro_batch: int,
    strategy: Strategy,
    world_size: int,
    checkpointing: bool,
    defer_gradient_sync: bool = False,
) -> MemoryBreakdown:
    """The peak bytes one GPU holds training `config` this way (defer_gradient_sync: FSDP keeps
    whole gradients until a step's last micro-batch)."""
    parameters = config.parameters()
    saved, recompute, logits = activation_bytes(config, micro_batch * seq_len, checkpointing)
    if strategy == "ddp":
        shard, autocast, working = parameters, parameters * AUTOCAST_WEIGHT_BYTES, 0
    else:
        shard = -(-parameters // world_size)  # ceil: the last rank's shard is padded
        autocast = 0
        largest_unit = max(_unit_parameters(config))
        # Each unit in flight: gathered bf16 weights; the one in its backward also its bf16
        # gradient and the fp32 copy reduce-scattered (fp32 reduction).
        working = largest_unit * (FSDP_UNITS_IN_FLIGHT * COMPUTE_BYTES + COMPUTE_BYTES + 4)
    return MemoryBreakdown(
        weights=shard * 4,
        gradients=shard * 4,
        optimizer=shard * 8,
        autocast_weights=autocast,
        working=working,
        activations=saved,
        recompute=recompute,
        logits=logits,
        whole_gradients=parameters * 4 if strategy == "fsdp" and defer_gradient_sync else 0,
    )


def _divisors_descending(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def plan(
    config: ModelConfig,
    *,
    seq_len: int,
    batch_size: int,
    instances: list[Instance],
    max_instance_count: int = 1,
    step_seconds: Callable[[MemoryPlan], float] | None = None,
) -> MemoryPlan:
    """The first instance type and count, in order of preference, that holds the job, and how.

    Instances are tried in the order given, each at 1..max_instance_count (more than one only
    under FSDP: a replica that does not fit one node does not fit two). On each, the ways are: a
    replica per GPU (DDP), FSDP, a replica with activation checkpointing, FSDP with it — each with
    the largest micro-batch that fits (a divisor of the sequences a rank runs per step, as the
    trainer accumulates), and under FSDP with more than one micro-batch also with its gradient
    sync deferred to the last micro-batch where the whole gradients fit. FSDP needs two GPUs or
    more. The world size must divide the batch.

    Without `step_seconds` the first way that fits is taken, in that order: sharding before
    recomputation, as sharding's communication overlaps the compute where checkpointing costs a
    third more compute. With it (a plan's seconds per optimizer step: shared.pricing's time
    model) the fastest of the ways that fit on the first instance type and count that holds
    the job: at a large batch, a micro-batch recomputation lets grow can cost less than the
    weights FSDP gathers again for every one of many small micro-batches.
    """
    if not instances:
        raise DoesNotFit("no instance types to plan on")
    tried: list[tuple[int, str]] = []
    for instance in instances:
        usable = instance.usable_bytes
        for count in range(1, max_instance_count + 1):
            world = instance.gpus * count
            if batch_size % world:
                continue  # every rank runs the same number of whole sequences
            ways: list[tuple[Strategy, bool]] = []
            if count == 1:
                ways.append(("ddp", False))
            if world > 1:
                ways.append(("fsdp", False))
            if count == 1:
                ways.append(("ddp", True))
            if world > 1:
                ways.append(("fsdp", True))
            fitting: list[MemoryPlan] = []
            for strategy, checkpointing in ways:
                for defer in ((True, False) if strategy == "fsdp" and step_seconds is not None else (False,)):
                    for micro in _divisors_descending(batch_size // world):
                        if defer and micro == batch_size // world:
                            continue  # one micro-batch: nothing to defer
                        need = bytes_per_gpu(
                            config, seq_len=seq_len, micro_batch=micro, strategy=strategy,
                            world_size=world, checkpointing=checkpointing, defer_gradient_sync=defer,
                        )
                        if need.total <= usable:
                            fitting.append(MemoryPlan(
                                instance_type=instance.type,
                                instance_count=count,
                                world_size=world,
                                strategy=strategy,
                                micro_batch=micro,
                                activation_checkpointing=checkpointing,
                                per_gpu=need,
                                gpu_usable_bytes=usable,
                                defer_gradient_sync=defer,
                                batch_size=batch_size,
                            ))
                            break
                        tried.append((need.total, instance.type))
                    if fitting and step_seconds is None:
                        return fitting[0]
            if fitting:
                # min keeps the earliest of equally fast ways: the order above breaks ties.
                return min(fitting, key=step_seconds)
    smallest = min(tried)[0] if tried else 0
    largest = max(i.usable_bytes for i in instances)
    raise DoesNotFit(
        f"the job needs at least {smallest / GIB:.1f} GiB per GPU, more than the {largest / GIB:.1f} GiB "
        f"usable on the instances allowed ({', '.join(i.type for i in instances)}; "
        f"at most {max_instance_count} of a type)"
    )
