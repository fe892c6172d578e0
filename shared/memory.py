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
INDEX_BYTES = 8  # int64 token ids (the embedding's input)
# Targets that the loss does not score (PyTorch's cross_entropy convention).
IGNORE_INDEX = -100
# The loss computes the logits of this many bytes (fp32) of tokens at a time: 256 MiB is 523
# tokens of a 128k vocabulary, and whole micro-batches of a small one.
LOSS_CHUNK_BYTES = 256 << 20
# Headroom that is not counted: the CUDA context and cuBLAS workspaces, NCCL's buffers, and what
# the caching allocator loses to fragmentation. An assumption, not a measurement.
RESERVE_BYTES = 2 * GIB
USABLE_FRACTION = 0.92
HOST_RESERVE_BYTES = 4 * GIB
# FSDP prefetches the next unit while the current one computes: two gathered units at a time.
FSDP_UNITS_IN_FLIGHT = 2

Strategy = Literal["ddp", "fsdp"]


class Instance(BaseModel):
    """One instance type as the plan sees it: its GPUs and the memory of each."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    gpus: int
    gpu_memory_bytes: int
    host_memory_bytes: int | None = None  # the instance's RAM, shared by its ranks (None: not planned)

    @property
    def usable_bytes(self) -> int:
        return int(self.gpu_memory_bytes * USABLE_FRACTION) - RESERVE_BYTES

    @property
    def host_usable_bytes(self) -> int | None:
        """RAM the ranks may use: the operating system, SageMaker's agents and the data loaders'
        files keep the rest (HOST_RESERVE_BYTES, USABLE_FRACTION: assumed, like the GPU's)."""
        if self.host_memory_bytes is None:
            return None
        return int(self.host_memory_bytes * USABLE_FRACTION) - HOST_RESERVE_BYTES


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
    # A contract job's healing: the frozen source's weights and what its forward pass keeps.
    teacher: int = 0

    @property
    def total(self) -> int:
        return (
            self.weights + self.gradients + self.optimizer + self.autocast_weights + self.working
            + self.activations + self.recompute + self.logits + self.whole_gradients + self.teacher
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
    # A contract job's other peaks: per GPU while it chooses and cuts (before healing), and per
    # rank on the host (ContractFootprint).
    choosing_per_gpu: int | None = None
    host_per_rank: int | None = None
    host_per_instance: int | None = None  # its ranks' peaks and what one rank holds beside (the delivered model)

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
    """Bytes saved per token outside the blocks: token ids, the final norm, and what the chunked
    loss keeps: the gradient of its input (the head's), computed in its forward pass. No logits;
    the head's weight gradient it keeps beside is counted once, in logits_peak_bytes."""
    C = config.dim
    return INDEX_BYTES + C * RESIDUAL_BYTES + 4 + C * compute_bytes


def head_weight_gradient_bytes(config: ModelConfig) -> int:
    """The head's weight gradient as the chunked loss sums it over its chunks: fp32, the weight's
    shape. Computed in the loss's forward pass and kept for its backward."""
    return config.vocab_size * config.dim * 4


def loss_chunk_tokens(vocab_size: int) -> int:
    """Tokens whose logits the loss computes at once: LOSS_CHUNK_BYTES of fp32 logits."""
    return max(1, LOSS_CHUNK_BYTES // (4 * vocab_size))


def logits_peak_bytes(config: ModelConfig, tokens: int, compute_bytes: int = COMPUTE_BYTES) -> int:
    """The loss's transient peak for a micro-batch of `tokens` tokens: one chunk's logits in the
    compute dtype, their fp32 copy and one more fp32 tensor of that size (the logits' gradient,
    in the compute dtype, is at most that); and the head's weight gradient
    (head_weight_gradient_bytes, with each chunk's share in the compute dtype when that is not
    fp32). Bounded whatever the micro-batch: it no longer grows with the tokens."""
    V, C, a = config.vocab_size, config.dim, compute_bytes
    chunk = min(tokens, loss_chunk_tokens(V))
    weight_gradient = head_weight_gradient_bytes(config) + (V * C * a if a != 4 else 0)
    return chunk * V * (a + 4 + 4) + weight_gradient


def activation_bytes(config: ModelConfig, tokens: int, checkpointing: bool,
                     compute_bytes: int = COMPUTE_BYTES) -> tuple[int, int, int]:
    """(saved activations, recompute peak, logits peak) for `tokens` tokens in one micro-batch.

    Checkpointing keeps only each block's fp32 input and rebuilds one block at a time in the
    backward pass, so the largest block's activations come back once.
    """
    if checkpointing:
        blocks = config.n_layers * config.dim * RESIDUAL_BYTES
        recompute = max(block_activation_bytes(config, layer, compute_bytes) for layer in config.layers)
    else:
        blocks = sum(block_activation_bytes(config, layer, compute_bytes) for layer in config.layers)
        recompute = 0
    saved = blocks + head_activation_bytes(config, compute_bytes)
    return saved * tokens, recompute * tokens, logits_peak_bytes(config, tokens, compute_bytes)


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
    compute_bytes: int = COMPUTE_BYTES,
) -> MemoryBreakdown:
    """The peak bytes one GPU holds training `config` this way (defer_gradient_sync: FSDP keeps
    whole gradients until a step's last micro-batch; `compute_bytes` 4: in fp32, as on a CPU: no
    bf16 copies)."""
    parameters = config.parameters()
    saved, recompute, logits = activation_bytes(config, micro_batch * seq_len, checkpointing, compute_bytes)
    if strategy == "ddp":
        copies = AUTOCAST_WEIGHT_BYTES if compute_bytes != 4 else 0
        shard, autocast, working = parameters, parameters * copies, 0
    else:
        shard = -(-parameters // world_size)  # ceil: the last rank's shard is padded
        autocast = 0
        largest_unit = max(_unit_parameters(config))
        # Each unit in flight: gathered bf16 weights; the one in its backward also its bf16
        # gradient and the fp32 copy reduce-scattered (fp32 reduction).
        working = largest_unit * (FSDP_UNITS_IN_FLIGHT * compute_bytes + compute_bytes + 4)
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


# ----------------------------------------------------------------------------- contract jobs

# Windows a contract job's forward-only passes (calibration) run at once.
CALIBRATION_BATCH = 8
GRAM_BYTES = 8  # the calibration statistics accumulate in fp64


def forward_transient_bytes(config: ModelConfig, tokens: int, compute_bytes: int = COMPUTE_BYTES) -> int:
    """A forward pass without gradients at `tokens` tokens: the fp32 residual stream in and out of
    a block, and the largest MLP's gate, up and their product (nothing is kept between blocks).
    An estimate, not a count: no test measures it."""
    widest = max(layer.mlp_hidden for layer in config.layers)
    return tokens * (2 * config.dim * RESIDUAL_BYTES + 3 * widest * compute_bytes)


def _eval_logits_bytes(config: ModelConfig, tokens: int, compute_bytes: int) -> int:
    """The chunked loss without gradients: one chunk's logits, their fp32 copy and exponentials."""
    return min(tokens, loss_chunk_tokens(config.vocab_size)) * config.vocab_size * (compute_bytes + 4 + 4)


def _grams_bytes(source: ModelConfig, layer: LayerShape) -> int:
    """A layer's two fp64 activation Grams: MLP width squared and attention width squared."""
    return (layer.mlp_hidden ** 2 + (layer.n_heads * source.head_dim) ** 2) * GRAM_BYTES


def _largest_layers(source: ModelConfig, chosen_layers: int, size: Callable[[LayerShape], int]) -> int:
    """The sum of `size` over the `chosen_layers` layers where it is largest (the job chooses
    which after it is priced)."""
    return sum(sorted((size(layer) for layer in source.layers), reverse=True)[:chosen_layers])


def choosing_bytes(source: ModelConfig, student: ModelConfig, chosen_layers: int, seq_len: int) -> int:
    """Peak bytes on a GPU while a contract job chooses and cuts, before it heals.

    The source is read from its files one unit at a time (a block, the embeddings, or the final
    norm with the head, in fp32) and the windows of a pass go through one block before the next
    is read: the device holds one unit, the hidden states (fp32) of the largest pass's windows
    (the held-out windows, CONTRACT_HELDOUT_WINDOWS, or the reconstruction's two streams of the
    calibration windows, as if one rank ran them all), one batch's new ones, the forward pass's
    transient at CALIBRATION_BATCH windows with the chunked loss's logits, and the Grams of the
    block being calibrated (summed over the ranks, then sent to the host) or, in the
    reconstruction, a cut block and its projection's moments. Then the chosen blocks are cut one
    at a time (before the reconstruction): one block, its Grams brought back, and the surgery's
    working matrices (its Gram's inverse, a damped copy and the downdated one, with the fp64
    output projection; heads: three such for the twin searches). The cut blocks are built on the
    host (contract_host_bytes)."""
    from shared.settings import CONTRACT_CALIBRATION_WINDOWS, CONTRACT_HELDOUT_WINDOWS

    tokens = CALIBRATION_BATCH * seq_len
    block = max(source.layer_parameters(layer) for layer in source.layers) * 4
    unit = max(block, (source.vocab_size * source.dim + source.dim) * 4)
    held = max(CONTRACT_HELDOUT_WINDOWS, 2 * CONTRACT_CALIBRATION_WINDOWS) * seq_len * source.dim * RESIDUAL_BYTES
    batch = tokens * source.dim * RESIDUAL_BYTES
    forward = forward_transient_bytes(source, tokens, 4) + _eval_logits_bytes(source, tokens, 4)
    grams = max(_grams_bytes(source, layer) for layer in source.layers)
    surgery = max(
        (3 * max(layer.mlp_hidden ** 2, (layer.n_heads * source.head_dim) ** 2)
         + 2 * source.dim * max(layer.mlp_hidden, layer.n_heads * source.head_dim)) * GRAM_BYTES
        for layer in source.layers
    )
    # The reconstruction's turn at a cut block: that block beside the source's, and the Gram and
    # cross-moments of one of its output projections.
    reconstructing = block + max(
        (width ** 2 + source.dim * width) * GRAM_BYTES
        for layer in source.layers for width in (layer.mlp_hidden, layer.n_heads * source.head_dim)
    )
    streaming = unit + held + batch + forward + max(grams, reconstructing)
    cutting = block + grams + surgery
    return max(streaming, cutting)


def _teacher_sharded(strategy: Strategy, world_size: int) -> bool:
    """The teacher is sharded with the student (training_image.parallel.frozen_model)."""
    return strategy == "fsdp" and world_size > 1


def distillation_peak_bytes(config: ModelConfig, tokens: int, compute_bytes: int = COMPUTE_BYTES) -> int:
    """The distillation loss's transient peak (model.chunked_kl_divergence) for a micro-batch of
    `tokens` tokens, over one chunk of tokens: forward, both models' fp32 log-probabilities and
    the teacher's probabilities; backward, the student's fp32 probabilities and the teacher's
    (with its logits in the compute dtype as they are cast), beside the student head's weight
    gradient (as logits_peak_bytes counts it). Bounded whatever the micro-batch."""
    V, C, a = config.vocab_size, config.dim, compute_bytes
    chunk = min(tokens, loss_chunk_tokens(V))
    weight_gradient = head_weight_gradient_bytes(config) + (V * C * a if a != 4 else 0)
    forward = chunk * V * 3 * 4
    backward = chunk * V * (4 + 4 + (a if a != 4 else 0)) + weight_gradient
    return max(forward, backward)


def healing_bytes(
    source: ModelConfig, student: ModelConfig, *, seq_len: int, micro_batch: int, strategy: Strategy,
    world_size: int, checkpointing: bool, compute_bytes: int = COMPUTE_BYTES,
) -> MemoryBreakdown:
    """Peak bytes on a GPU while a contract job heals: the student as a train job holds it
    (bytes_per_gpu), the distillation loss in place of the language-model loss, and the frozen
    source (the teacher) in the compute precision: replicated, or where the student is sharded,
    sharded over the same ranks (its blocks and embeddings; FSDP_UNITS_IN_FLIGHT of them
    gathered; its head and final norm whole), with what its forward pass keeps for the loss:
    its final hidden states and each token's log-sum-exp, and the transient of its forward
    pass."""
    tokens = micro_batch * seq_len
    student_need = bytes_per_gpu(student, seq_len=seq_len, micro_batch=micro_batch, strategy=strategy,
                                 world_size=world_size, checkpointing=checkpointing, compute_bytes=compute_bytes)
    if _teacher_sharded(strategy, world_size):
        # Its blocks and embeddings sharded, each gathered whole to run; the head and final norm
        # whole on every rank (the distillation loss reads the head's weight).
        whole = source.vocab_size * source.dim + source.dim
        units = [source.layer_parameters(layer) for layer in source.layers]
        if not source.tie_embeddings:
            units.append(source.vocab_size * source.dim)
        weights = (-(-(source.parameters() - whole) // world_size) + whole) * compute_bytes
        weights += FSDP_UNITS_IN_FLIGHT * max(units) * compute_bytes
    else:
        weights = source.parameters() * compute_bytes
    teacher = weights + tokens * (source.dim * compute_bytes + 4) + forward_transient_bytes(source, tokens, compute_bytes)
    return student_need.model_copy(update={
        "logits": distillation_peak_bytes(student, tokens, compute_bytes), "teacher": teacher,
    })


def contract_host_bytes(source: ModelConfig, student: ModelConfig, on_gpu: bool, *, chosen_layers: int,
                        seq_len: int = 0, strategy: Strategy = "ddp", world_size: int = 1,
                        healing: MemoryBreakdown | None = None) -> int:
    """Peak bytes on the host for one rank of a contract job.

    With a GPU, the source never is on the host whole: its files are read in place, one tensor
    at a time (the largest, in fp32, counted). While it chooses and cuts, a rank holds the
    chosen layers' Grams (fp64) and the cut blocks (fp32, counted at the source's size of the
    largest layers); then, once the student is on the GPU, its part of the pruned weights (a
    shard when the student is sharded, else the whole) is kept in case healing makes the model
    worse. Without one, the host is the device: the larger of the choosing phase (choosing_bytes
    with those Grams and cut blocks) and the healing phase (healing_bytes, computed in fp32)
    with that kept copy. Rank 0's gathering of the delivered model is contract_output_host_bytes."""
    chosen = chosen_host_bytes(source, chosen_layers)
    kept = -(-student.parameters() // world_size) * 4 if _teacher_sharded(strategy, world_size) else student.parameters() * 4
    if on_gpu:
        tensor = max(source.vocab_size, 3 * max(layer.mlp_hidden for layer in source.layers)) * source.dim * 4
        return max(chosen, kept) + tensor
    choosing = choosing_bytes(source, student, chosen_layers, seq_len) + chosen
    return max(choosing, (healing.total if healing else 0) + kept)


def chosen_host_bytes(source: ModelConfig, chosen_layers: int) -> int:
    """What the host keeps of the chosen layers while a contract job cuts them: their Grams
    (fp64, summed over the ranks) and the cut blocks (fp32, counted at the source's size), of
    the layers where they are largest."""
    grams = _largest_layers(source, chosen_layers, lambda layer: _grams_bytes(source, layer))
    return grams + _largest_layers(source, chosen_layers, source.layer_parameters) * 4


def contract_output_host_bytes(student: ModelConfig) -> int:
    """What rank 0 holds on the host, beyond its own peak, to write the delivered model: the whole
    student in fp32, gathered from the ranks (training_image.parallel.full_model)."""
    return student.parameters() * 4


def plan_contract(
    source: ModelConfig,
    *,
    seq_len: int,
    batch_size: int,
    instances: list[Instance],
    chosen_layers: int,
    student: ModelConfig | None = None,
    max_instance_count: int = 1,
) -> MemoryPlan:
    """Where and how a contract job runs: as plan() does for a train job, over the same ways
    (the student replicated or sharded, its activations recomputed or not), with the contract
    job's footprint on each: a GPU must hold both phases (choosing_bytes, healing_bytes) and an
    instance's RAM its ranks' host peaks (contract_host_bytes) and rank 0's gathered output
    (contract_output_host_bytes). The teacher is sharded where the student is.

    `student`: the contracted model's shape; by default the source's own, an upper bound
    (contraction only removes), as the price is fixed before the job chooses what goes."""
    student = student or source
    choosing = choosing_bytes(source, student, chosen_layers, seq_len)

    def host(strategy: Strategy, world: int) -> int:
        return contract_host_bytes(source, student, True, chosen_layers=chosen_layers, strategy=strategy,
                                   world_size=world)

    def need(micro: int, strategy: Strategy, world: int, checkpointing: bool, defer: bool) -> MemoryBreakdown:
        return healing_bytes(source, student, seq_len=seq_len, micro_batch=micro, strategy=strategy,
                             world_size=world, checkpointing=checkpointing)

    return _first_fit(need, batch_size=batch_size, instances=instances, max_instance_count=max_instance_count,
                      choosing=choosing, host=host, host_once=contract_output_host_bytes(student),
                      what="the contract job")


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

    def need(micro: int, strategy: Strategy, world: int, checkpointing: bool, defer: bool) -> MemoryBreakdown:
        return bytes_per_gpu(config, seq_len=seq_len, micro_batch=micro, strategy=strategy,
                             world_size=world, checkpointing=checkpointing, defer_gradient_sync=defer)

    return _first_fit(need, batch_size=batch_size, instances=instances, max_instance_count=max_instance_count,
                      what="the job", step_seconds=step_seconds)


def _first_fit(need, *, batch_size: int, instances: list[Instance], max_instance_count: int, what: str,
               choosing: int | None = None, host: Callable[[Strategy, int], int] | None = None, host_once: int = 0,
               step_seconds: Callable[[MemoryPlan], float] | None = None) -> MemoryPlan:
    """plan()'s search, for a footprint `need(micro_batch, strategy, world, checkpointing, defer)`;
    a contract job adds its choosing phase (per GPU, whatever the layout), its host peak per rank
    (`host(strategy, world)`) and what one rank of the job holds beside it (`host_once`): an
    instance's RAM holds its ranks' peaks and that. Deferring the gradient sync is tried only
    with `step_seconds` (which chooses by speed)."""
    if not instances:
        raise DoesNotFit("no instance types to plan on")
    tried: list[tuple[int, str]] = []
    host_short: list[tuple[int, int, Instance]] = []
    for instance in instances:
        usable = instance.usable_bytes
        host_usable = instance.host_usable_bytes
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
                per_rank = host(strategy, world) if host is not None else None
                if per_rank is not None and host_usable is not None and per_rank * instance.gpus + host_once > host_usable:
                    host_short.append((per_rank * instance.gpus + host_once, per_rank, instance))
                    continue
                for defer in ((True, False) if strategy == "fsdp" and step_seconds is not None else (False,)):
                    for micro in _divisors_descending(batch_size // world):
                        if defer and micro == batch_size // world:
                            continue  # one micro-batch: nothing to defer
                        per_gpu = need(micro, strategy, world, checkpointing, defer)
                        peak = max(per_gpu.total, choosing or 0)
                        if peak <= usable:
                            fitting.append(MemoryPlan(
                                instance_type=instance.type,
                                instance_count=count,
                                world_size=world,
                                strategy=strategy,
                                micro_batch=micro,
                                activation_checkpointing=checkpointing,
                                per_gpu=per_gpu,
                                gpu_usable_bytes=usable,
                                defer_gradient_sync=defer,
                                batch_size=batch_size,
                                choosing_per_gpu=choosing,
                                host_per_rank=per_rank,
                                host_per_instance=None if per_rank is None else per_rank * instance.gpus + host_once,
                            ))
                            break
                        tried.append((peak, instance.type))
                    if fitting and step_seconds is None:
                        return fitting[0]
            if fitting:
                # min keeps the earliest of equally fast ways: the order above breaks ties.
                return min(fitting, key=step_seconds)
    allowed = f"{', '.join(i.type for i in instances)}; at most {max_instance_count} of a type"
    largest = max(i.usable_bytes for i in instances)
    reason = ""
    if choosing is not None and choosing > largest:
        reason = (f" (choosing what to remove holds one source block, the windows' hidden states and a block's "
                  f"statistics on each GPU: {choosing / GIB:.1f} GiB)")
    if not tried and host_short:
        needed, per_rank, instance = min(host_short, key=lambda item: item[0])
        also = f"; and {reason[2:-1]}, more than the {largest / GIB:.1f} GiB usable on a GPU" if reason else ""
        raise DoesNotFit(
            f"{what} needs {needed / GIB:.1f} GiB of host memory on each instance ({per_rank / GIB:.1f} GiB "
            f"for each of its {instance.gpus} ranks and {host_once / GIB:.1f} GiB for the delivered model), more "
            f"than the {instance.host_usable_bytes / GIB:.1f} GiB usable on the instances allowed ({allowed}){also}"
        )
    smallest = min(tried)[0] if tried else 0
    raise DoesNotFit(
        f"{what} needs at least {smallest / GIB:.1f} GiB per GPU{reason}, more than the {largest / GIB:.1f} GiB "
        f"usable on the instances allowed ({allowed})"
    )
