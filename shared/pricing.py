"""Cost and time of a job, before it runs (the estimate) and after (the bill).

Money is `Decimal` throughout and rounded once, at the end, to cents. The price table lives in
`prices.json` beside this file (operators may point FUSION_PRICES at another copy).

Where a job runs is the memory plan's answer (shared.memory) over the instance types its tier
allows: the estimate carries the instance type and count, the strategy, the micro-batch and
whether activations are recomputed, and the ETA follows them. The price is the tier's, per token.
"""

from __future__ import annotations

import json
import os
from decimal import ROUND_HALF_UP, Decimal
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from shared import memory

from shared.settings import (
    CONTRACT_CALIBRATION_PASSES,
    CONTRACT_CALIBRATION_WINDOWS,
    CONTRACT_EVALUATIONS,
    CONTRACT_HELDOUT_WINDOWS,
    CONTRACT_SEQ_LEN,
    ContractSettings,
    EvaluateSettings,
    TrainSettings,
)
from shared.shapes import ContractionForecast, ModelConfig, batch_size_for, forecast_contraction, grown_config, growth_parameters

CENT = Decimal("0.01")
MILLION = Decimal(1_000_000)


class Tier(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    max_parameters: int | None
    usd_per_million_tokens: Decimal
    contraction_fee: Decimal
    usd_per_million_evaluated_tokens: Decimal  # an evaluate job's forward tokens (per model, at its tier)
    instance_types: list[str] = Field(min_length=1)  # in order of preference
    max_instance_count: int = Field(ge=1)
    spot: bool = False  # managed spot capacity (checkpoints make an interruption a resume)


class Gpus(BaseModel):
    """The GPUs of one instance type: how many, the memory of each (decimal GB, as sold), and the
    bandwidth their collectives run at: within the instance (GB/s per GPU: NVLink, or PCIe) and
    between instances (GB/s per instance: EFA, or the ENA network)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    count: int = Field(ge=1)
    memory_gb: float = Field(gt=0)
    interconnect_gb_per_s: float = Field(gt=0)
    network_gb_per_s: float = Field(gt=0)
    host_memory_gib: float | None = Field(default=None, gt=0)  # the instance's RAM (GiB, as AWS lists it)


class PriceTable(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    growth_fee_per_million_parameters: Decimal
    minimum_charge_usd: Decimal = Field(gt=0)
    tiers: list[Tier]
    flops_per_second: dict[str, float]
    gpus: dict[str, Gpus]
    model_flops_utilization: float
    # Per instance type, the utilization bench/gpu.sh measured on its card (its "ETA util."
    # figure); model_flops_utilization, the assumed one, for the types not listed.
    measured_flops_utilization: dict[str, float] = {}
    startup_seconds: float
    max_runtime_margin: float

    def tier_for(self, parameters: int) -> Tier:
        for tier in self.tiers:
            if tier.max_parameters is None or parameters <= tier.max_parameters:
                return tier
        return self.tiers[-1]

    def instance(self, instance_type: str) -> memory.Instance:
        gpus = self.gpus.get(instance_type)
        if gpus is None:
            raise KeyError(f"no GPU figures for instance type {instance_type!r} in the price table")
        host = int(gpus.host_memory_gib * memory.GIB) if gpus.host_memory_gib is not None else None
        return memory.Instance(type=instance_type, gpus=gpus.count, gpu_memory_bytes=int(gpus.memory_gb * 1e9),
                               host_memory_bytes=host)


@lru_cache(maxsize=4)
def _load(path: str) -> PriceTable:
    return PriceTable.model_validate(json.loads(Path(path).read_text()))


def price_table() -> PriceTable:
    return _load(os.environ.get("FUSION_PRICES", str(Path(__file__).with_name("prices.json"))))


class Estimate(BaseModel):
    """The priced breakdown of one job. Components are exact; `total` is rounded to cents once."""

    model_config = ConfigDict(frozen=True)

    job_type: str
    training_tokens: int  # the billed tokens: turns x steps x seq_len
    parameters: int  # of the model being trained (after growth) or of the contraction source
    tier: str
    usd_per_million_tokens: Decimal
    training_cost: Decimal
    growth_parameters: int
    growth_fee: Decimal
    contraction_fee: Decimal
    # The least any job that reaches a GPU pays (prices.json): no job is free, however small.
    minimum_charge: Decimal = Decimal(0)
    # An evaluate job: the forward tokens of every model (shared.settings.EvaluateSettings), each model's at
    # its own tier's rate; evaluation_cost is billed pro rata to the tokens evaluated.
    evaluated_tokens: int = 0
    evaluation_cost: Decimal = Decimal(0)
    total: Decimal
    instance_type: str
    instance_count: int
    eta_seconds: int
    max_runtime_seconds: int
    # Each step trains on a batch of sequences: the tokens the model sees are the billed tokens
    # times this. None on records priced before it was recorded.
    sequences_per_step: int | None = None
    trained_tokens: int | None = None
    launch_seconds: int | None = None  # the part of eta_seconds that is starting the instance, not training
    # How the trainer runs it (the memory plan); defaults are what a record from before plans meant.
    strategy: memory.Strategy = "ddp"
    micro_batch: int | None = None  # None: the whole per-rank batch at once
    activation_checkpointing: bool = False
    defer_gradient_sync: bool = False
    spot: bool = False
    # A contract job: the size the contracted model is forecast to have (shared.shapes).
    contraction: ContractionForecast | None = None

    def layout(self) -> memory.Layout:
        return memory.Layout(
            strategy=self.strategy, micro_batch=self.micro_batch, activation_checkpointing=self.activation_checkpointing,
            defer_gradient_sync=self.defer_gradient_sync,
        )


# Forward-only tokens of a contract job, at most (shared.settings says which passes they are).
CONTRACT_FORWARD_TOKENS = (
    CONTRACT_CALIBRATION_PASSES * CONTRACT_CALIBRATION_WINDOWS + CONTRACT_EVALUATIONS * CONTRACT_HELDOUT_WINDOWS
) * CONTRACT_SEQ_LEN


def _seconds(table: PriceTable, flop_count: float, instance_type: str, count: int) -> float:
    flops = table.flops_per_second.get(instance_type)
    if flops is None:
        raise KeyError(f"no throughput figure for instance type {instance_type!r} in the price table")
    utilization = table.measured_flops_utilization.get(instance_type, table.model_flops_utilization)
    return flop_count / (flops * utilization * count)


def flops_per_token(config: ModelConfig, seq_len: int, recompute: bool = False) -> float:
    """Training FLOPs per token: 6 x parameters for the matmuls of the forward and backward
    passes, plus causal attention's own (q k^T and the weighted sum of v: 2 x 2 x H x D x seq_len/2
    a layer forward, three times that trained); 8 and 4 x when blocks recompute their forward.
    Each optimizer step runs a batch of sequences (shapes.batch_size_for): that many times the
    billed steps x seq_len tokens are trained."""
    passes = 4.0 if recompute else 3.0
    attention = sum(layer.n_heads for layer in config.layers) * config.head_dim * seq_len
    return passes * (2.0 * config.parameters() + 2.0 * attention)


# Bytes each GPU's collectives move, per parameter, under FSDP on a GPU: for each micro-batch
# the bf16 weights gathered for the forward and again for the backward (each unit is freed in
# between); the fp32 gradients reduce-scattered for each micro-batch, or once a step when the
# plan defers the sync to the last one.
FSDP_GATHER_BYTES_PER_PARAMETER = 2 + 2
FSDP_REDUCE_BYTES_PER_PARAMETER = 4
# DDP all-reduces fp32 gradients once a step (the micro-batches before the last skip it): a ring
# all-reduce is a reduce-scatter and an all-gather, each of them the gradients once.
DDP_BYTES_PER_PARAMETER = 2 * 4


def communication_bytes(plan: memory.MemoryPlan, parameters: int) -> float:
    """Bytes a step's collectives move through each GPU's link (ring algorithms: (W-1)/W of the
    data), for the plan's strategy, world size, micro-batches and gradient sync."""
    world = plan.world_size
    if world == 1:
        return 0.0
    share = (world - 1) / world
    if plan.strategy == "fsdp":
        syncs = 1 if plan.defer_gradient_sync else plan.micro_batches
        per_parameter = FSDP_GATHER_BYTES_PER_PARAMETER * plan.micro_batches + FSDP_REDUCE_BYTES_PER_PARAMETER * syncs
        return share * parameters * per_parameter
    return share * parameters * DDP_BYTES_PER_PARAMETER


def step_seconds(
    config: ModelConfig, seq_len: int, plan: memory.MemoryPlan, table: PriceTable
) -> tuple[float, float]:
    """(compute, communication) seconds of one optimizer step on the plan's instances.

    Communication runs at the instance's interconnect within one instance, and at its network
    bandwidth between instances (NCCL spreads each ring over the instance's NICs, so a step's
    bytes cross each instance's network once). The two overlap (DDP's buckets, FSDP's
    prefetch): a step takes the longer of them."""
    batch = plan.batch_size or batch_size_for(config.parameters(), seq_len)
    flop_count = flops_per_token(config, seq_len, plan.activation_checkpointing) * batch * seq_len
    compute = _seconds(table, flop_count, plan.instance_type, plan.instance_count)
    gpus = table.gpus[plan.instance_type]
    bandwidth = (gpus.network_gb_per_s if plan.instance_count > 1 else gpus.interconnect_gb_per_s) * 1e9
    return compute, communication_bytes(plan, config.parameters()) / bandwidth


def memory_plan(
    config: ModelConfig, seq_len: int, tier: Tier, table: PriceTable, instance_type: str | None = None
) -> memory.MemoryPlan:
    """Where and how `config` trains at `seq_len`: the memory plan over the tier's instance types
    (or the one given), the fastest way on the first that holds it. Raises memory.DoesNotFit
    when none of them holds it."""
    types = [instance_type] if instance_type else tier.instance_types
    return memory.plan(
        config,
        seq_len=seq_len,
        batch_size=batch_size_for(config.parameters(), seq_len),
        instances=[table.instance(t) for t in types],
        max_instance_count=1 if instance_type else tier.max_instance_count,
        step_seconds=lambda chosen: max(step_seconds(config, seq_len, chosen, table)),
    )


def contract_plan(
    settings: ContractSettings, source: ModelConfig, tier: Tier, table: PriceTable, instance_type: str | None = None
) -> memory.MemoryPlan:
    """Where and how a contract job runs: memory.plan_contract over the tier's instance types (or
    the one given), the source's shape standing for the contracted one. Raises memory.DoesNotFit."""
    types = [instance_type] if instance_type else tier.instance_types
    return memory.plan_contract(
        source,
        seq_len=CONTRACT_SEQ_LEN,
        batch_size=batch_size_for(source.parameters()),
        instances=[table.instance(t) for t in types],
        chosen_layers=settings.num_layers_to_contract,
        max_instance_count=1 if instance_type else tier.max_instance_count,
    )


def _estimate(
    job_type: str,
    tokens: int,
    config: ModelConfig,
    seq_len: int,
    growth_parameters: int,
    with_contraction_fee: bool,
    instance_type: str | None,
    table: PriceTable,
    plan_for=None,
) -> Estimate:
    parameters = config.parameters()
    tier = table.tier_for(parameters)
    chosen = plan_for(tier, instance_type) if plan_for else memory_plan(config, seq_len, tier, table, instance_type)
    training_cost = Decimal(tokens) / MILLION * tier.usd_per_million_tokens
    growth_fee = Decimal(growth_parameters) / MILLION * table.growth_fee_per_million_parameters
    contraction_fee = tier.contraction_fee if with_contraction_fee else Decimal(0)
    total = max((training_cost + growth_fee + contraction_fee).quantize(CENT, rounding=ROUND_HALF_UP),
                table.minimum_charge_usd)
    instance, count = chosen.instance_type, chosen.instance_count
    compute, communication = step_seconds(config, seq_len, chosen, table)
    training = tokens / seq_len * max(compute, communication)  # optimizer steps x a step's time
    forward = 0.0
    if with_contraction_fee:
        forward = _seconds(table, flops_per_token(config, CONTRACT_SEQ_LEN) / 3 * CONTRACT_FORWARD_TOKENS, instance, count)
    eta = table.startup_seconds + training + forward
    return Estimate(
        job_type=job_type,
        training_tokens=tokens,
        parameters=parameters,
        tier=tier.name,
        usd_per_million_tokens=tier.usd_per_million_tokens,
        training_cost=training_cost,
        growth_parameters=growth_parameters,
        growth_fee=growth_fee,
        contraction_fee=contraction_fee,
        minimum_charge=table.minimum_charge_usd,
        total=total,
        instance_type=instance,
        instance_count=count,
        eta_seconds=round(eta),
        max_runtime_seconds=max(3600, round(eta * table.max_runtime_margin)),
        sequences_per_step=batch_size_for(parameters, seq_len),
        trained_tokens=tokens * batch_size_for(parameters, seq_len),
        launch_seconds=round(table.startup_seconds),
        strategy=chosen.strategy,
        micro_batch=chosen.micro_batch,
        activation_checkpointing=chosen.activation_checkpointing,
        defer_gradient_sync=chosen.defer_gradient_sync,
        spot=tier.spot,
    )


def estimate_train(
    settings: TrainSettings, base: ModelConfig, *, instance_type: str | None = None, table: PriceTable | None = None
) -> Estimate:
    """Price a train job: tokens at the tier of the grown model, plus the one-time growth fee.
    Raises memory.DoesNotFit when no instance of the tier holds the grown model."""
    table = table or price_table()
    grown = grown_config(base)
    return _estimate(
        "train",
        settings.training_tokens(),
        grown,
        settings.seq_len,
        growth_parameters(base),
        False,
        instance_type,
        table,
    )


def estimate_evaluate(
    settings: EvaluateSettings,
    models: list[ModelConfig],
    *,
    instance_type: str | None = None,
    table: PriceTable | None = None,
) -> Estimate:
    """Price an evaluate job: each model's forward tokens (max_windows x seq_len) at its own tier's
    evaluation rate. It runs where a training job of the largest model at that seq_len would (the
    memory plan's answer for training holds a forward pass with room to spare)."""
    table = table or price_table()
    per_model = settings.max_windows * settings.seq_len
    cost = sum((Decimal(per_model) / MILLION * table.tier_for(m.parameters()).usd_per_million_evaluated_tokens
                for m in models), Decimal(0))
    largest = max(models, key=lambda m: m.parameters())
    tier = table.tier_for(largest.parameters())
    chosen = memory_plan(largest, settings.seq_len, tier, table, instance_type)
    flop_count = sum(2.0 * m.parameters() * per_model for m in models)
    eta = table.startup_seconds + _seconds(table, flop_count, chosen.instance_type, chosen.instance_count)
    return Estimate(
        job_type="evaluate",
        training_tokens=0,
        parameters=largest.parameters(),
        tier=tier.name,
        usd_per_million_tokens=tier.usd_per_million_tokens,
        training_cost=Decimal(0),
        growth_parameters=0,
        growth_fee=Decimal(0),
        contraction_fee=Decimal(0),
        minimum_charge=table.minimum_charge_usd,
        evaluated_tokens=settings.evaluated_tokens(),
        evaluation_cost=cost,
        total=max(cost.quantize(CENT, rounding=ROUND_HALF_UP), table.minimum_charge_usd),
        instance_type=chosen.instance_type,
        instance_count=chosen.instance_count,
        eta_seconds=round(eta),
        max_runtime_seconds=max(3600, round(eta * table.max_runtime_margin)),
        strategy=chosen.strategy,
        micro_batch=chosen.micro_batch,
        activation_checkpointing=chosen.activation_checkpointing,
        spot=tier.spot,
    )


def estimate_contract(
    settings: ContractSettings,
    source: ModelConfig,
    *,
    instance_type: str | None = None,
    table: PriceTable | None = None,
) -> Estimate:
    """Price a contract job: the flat fee of the source's tier plus any healing tokens."""
    table = table or price_table()
    estimate = _estimate(
        "contract", settings.training_tokens(), source, CONTRACT_SEQ_LEN, 0, True, instance_type, table,
        plan_for=lambda tier, instance: contract_plan(settings, source, tier, table, instance),
    )
    forecast = forecast_contraction(source, settings.contraction_ratio, settings.num_layers_to_contract)
    return estimate.model_copy(update={"contraction": forecast})


def bill(estimate: Estimate, tokens_trained: int, tokens_evaluated: int = 0) -> Decimal:
    """What a job pays for what actually ran: fees in full, training pro rata to tokens trained,
    evaluation pro rata to tokens evaluated, and never less than the minimum charge.

    A completed job trained every estimated token, so its bill equals the estimate's total; an
    evaluation of a dataset with fewer windows than max_windows evaluated fewer and pays less.
    """
    tokens = min(max(tokens_trained, 0), estimate.training_tokens)
    training = Decimal(tokens) / MILLION * estimate.usd_per_million_tokens
    evaluation = Decimal(0)
    if estimate.evaluated_tokens:
        evaluated = min(max(tokens_evaluated, 0), estimate.evaluated_tokens)
        evaluation = estimate.evaluation_cost * evaluated / estimate.evaluated_tokens
    total = (training + evaluation + estimate.growth_fee + estimate.contraction_fee).quantize(CENT, rounding=ROUND_HALF_UP)
    return max(total, estimate.minimum_charge)


# Imported families' shapes the README plans beside the named sizes (Llama 3.2 1B, 3.1 8B, 3.1 70B,
# at an 8k context).
LLAMA_SHAPES: dict[str, ModelConfig] = {
    "llama-1b": ModelConfig.uniform(
        vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, mlp_hidden=8192, context_length=8192,
        tie_embeddings=True, rope_theta=500000.0,
    ),
    "llama-8b": ModelConfig.uniform(
        vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, mlp_hidden=14336, context_length=8192,
        rope_theta=500000.0,
    ),
    "llama-70b": ModelConfig.uniform(
        vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, mlp_hidden=28672, context_length=8192,
        rope_theta=500000.0,
    ),
}


def plan_table(table: PriceTable | None = None) -> str:
    """The table of docs/memory-plan.md: how a train job with the default settings runs for each
    named size and Llama shape (the model as trained, after growth), with a step's compute and
    communication seconds."""
    from shared.shapes import SIZES

    table = table or price_table()
    settings = TrainSettings()
    lines = [
        "| base | trained parameters | tier | tokens a step | instances | strategy | micro-batch of a rank's share "
        "| gradient sync | recompute | GiB per GPU (usable) | step s: compute / communication | ETA |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, base in {**SIZES, **LLAMA_SHAPES}.items():
        grown = grown_config(base)
        tier = table.tier_for(grown.parameters())
        batch = batch_size_for(grown.parameters(), settings.seq_len)
        try:
            chosen = memory_plan(grown, settings.seq_len, tier, table)
        except memory.DoesNotFit as error:
            lines.append(f"| {name} | {grown.parameters():,} | {tier.name} | {batch * settings.seq_len:,} "
                         f"| does not fit: {error} ||||||||")
            continue
        eta = estimate_train(settings, base, table=table).eta_seconds
        per_gpu, usable = chosen.per_gpu.total / memory.GIB, chosen.gpu_usable_bytes / memory.GIB
        compute, communication = step_seconds(grown, settings.seq_len, chosen, table)
        once = chosen.strategy == "ddp" or chosen.defer_gradient_sync or chosen.micro_batches == 1
        lines.append(
            f"| {name} | {grown.parameters():,} | {tier.name} | {batch * settings.seq_len:,} "
            f"| {chosen.instance_count} x {chosen.instance_type} "
            f"({chosen.world_size} GPU{'s' if chosen.world_size > 1 else ''}) | {chosen.strategy} "
            f"| {chosen.micro_batch} of {batch // chosen.world_size} "
            f"| {'once a step' if once else 'each micro-batch'} "
            f"| {'yes' if chosen.activation_checkpointing else 'no'} | {per_gpu:.1f} ({usable:.1f}) "
            f"| {compute:.3f} / {communication:.3f} | {eta / 3600:.1f} h |"
        )
    return "\n".join(lines)


def tier_table(table: PriceTable | None = None) -> str:
    """Each named size and Llama shape (after growth, default settings) on the instances of every
    tier, whichever tier its price falls in: where it fits, and a step's compute and
    communication seconds there (the price's own tier is marked *)."""
    from shared.shapes import SIZES

    table = table or price_table()
    seq_len = TrainSettings().seq_len
    lines = [
        "| base | " + " | ".join(f"{tier.name}: {' / '.join(tier.instance_types)}, at most {tier.max_instance_count}"
                                 for tier in table.tiers) + " |",
        "|---|" + "---|" * len(table.tiers),
    ]
    for name, base in {**SIZES, **LLAMA_SHAPES}.items():
        grown = grown_config(base)
        priced = table.tier_for(grown.parameters()).name
        cells = []
        for tier in table.tiers:
            try:
                chosen = memory_plan(grown, seq_len, tier, table)
            except memory.DoesNotFit:
                cells.append("does not fit")
                continue
            compute, communication = step_seconds(grown, seq_len, chosen, table)
            cells.append(f"{'*' if tier.name == priced else ''}{chosen.instance_count} x, {chosen.strategy}"
                         f"{', recompute' if chosen.activation_checkpointing else ''}: "
                         f"{compute:.3f} / {communication:.3f} s")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def contract_plan_table(table: PriceTable | None = None) -> str:
    """The contract table of docs/memory-plan.md: where a contract job with the default settings
    runs for each named size and Llama shape as its source (the source's shape standing for the
    contracted one, as priced), with its peaks per GPU and per instance's host."""
    from shared.shapes import SIZES

    table = table or price_table()
    defaults = ContractSettings.model_fields
    lines = [
        "| source | parameters | tier | instances | student | micro-batch of a rank's share | recompute "
        "| GiB per GPU: choosing / healing (usable) | host GiB per instance (usable) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, source in {**SIZES, **LLAMA_SHAPES}.items():
        layers = min(defaults["num_layers_to_contract"].default, source.n_layers)
        settings = ContractSettings(source_model_id="model", num_layers_to_contract=layers)
        tier = table.tier_for(source.parameters())
        try:
            chosen = contract_plan(settings, source, tier, table)
        except memory.DoesNotFit as error:
            lines.append(f"| {name} | {source.parameters():,} | {tier.name} | does not fit: {error} ||||||")
            continue
        instance = table.instance(chosen.instance_type)
        host_usable = instance.host_usable_bytes
        host = chosen.host_per_instance / memory.GIB
        share = batch_size_for(source.parameters()) // chosen.world_size
        host_text = f"{host:.1f} ({host_usable / memory.GIB:.1f})" if host_usable is not None else f"{host:.1f}"
        lines.append(
            f"| {name} | {source.parameters():,} | {tier.name} | {chosen.instance_count} x {chosen.instance_type} "
            f"({chosen.world_size} GPU{'s' if chosen.world_size > 1 else ''}) | {chosen.strategy} "
            f"| {chosen.micro_batch} of {share} | {'yes' if chosen.activation_checkpointing else 'no'} "
            f"| {chosen.choosing_per_gpu / memory.GIB:.1f} / {chosen.per_gpu.total / memory.GIB:.1f} "
            f"({chosen.gpu_usable_bytes / memory.GIB:.1f}) | {host_text} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(plan_table())
    print()
    print(tier_table())
    print()
    print(contract_plan_table())
