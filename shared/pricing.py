"""Cost and time of a job, before it runs (the estimate) and after (the bill).

Money is `Decimal` throughout and rounded once, at the end, to cents. The price table lives in
`prices.json` beside this file (operators may point FUSION_PRICES at another copy).
"""

from __future__ import annotations

import json
import os
from decimal import ROUND_HALF_UP, Decimal
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from shared.settings import ContractSettings, TrainSettings
from shared.shapes import ModelConfig, batch_size_for, grown_config

CENT = Decimal("0.01")
MILLION = Decimal(1_000_000)


class Tier(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    max_parameters: int | None
    usd_per_million_tokens: Decimal
    contraction_fee: Decimal
    instance_type: str
    instance_count: int


class PriceTable(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    growth_fee_per_million_parameters: Decimal
    minimum_charge_usd: Decimal = Field(gt=0)
    tiers: list[Tier]
    flops_per_second: dict[str, float]
    model_flops_utilization: float
    startup_seconds: float
    max_runtime_margin: float

    def tier_for(self, parameters: int) -> Tier:
        for tier in self.tiers:
            if tier.max_parameters is None or parameters <= tier.max_parameters:
                return tier
        return self.tiers[-1]


@lru_cache(maxsize=4)
def _load(path: str) -> PriceTable:
    return PriceTable.model_validate(json.loads(Path(path).read_text()))


def price_table() -> PriceTable:
    return _load(os.environ.get("FUSION_PRICES", str(Path(__file__).with_name("prices.json"))))


class Estimate(BaseModel):
    """The priced breakdown of one job. Components are exact; `total` is rounded to cents once."""

    model_config = ConfigDict(frozen=True)

    job_type: str
    training_tokens: int
    parameters: int  # of the model being trained (after growth) or of the contraction source
    tier: str
    usd_per_million_tokens: Decimal
    training_cost: Decimal
    growth_parameters: int
    growth_fee: Decimal
    contraction_fee: Decimal
    # The least any job that reaches a GPU pays (prices.json): no job is free, however small.
    minimum_charge: Decimal = Decimal(0)
    total: Decimal
    instance_type: str
    instance_count: int
    eta_seconds: int
    max_runtime_seconds: int


# Forward-only tokens of a contract job: a calibration sample and three held-out evaluations
# (source, pruned, healed) of up to 512 windows of 256 tokens each.
CONTRACT_FORWARD_TOKENS = (64 + 3 * 512) * 256


def _seconds(table: PriceTable, flop_count: float, instance_type: str, count: int) -> float:
    flops = table.flops_per_second.get(instance_type)
    if flops is None:
        raise KeyError(f"no throughput figure for instance type {instance_type!r} in the price table")
    return flop_count / (flops * table.model_flops_utilization * count)


def _training_flops(tokens: int, parameters: int) -> float:
    """6 x parameters FLOPs per token the model trains on. Each optimizer step runs a batch of
    sequences (shapes.batch_size_for), so it trains on that many times the billed steps x seq_len."""
    return 6.0 * parameters * tokens * batch_size_for(parameters)


def _estimate(
    job_type: str,
    tokens: int,
    parameters: int,
    growth_parameters: int,
    with_contraction_fee: bool,
    instance_type: str | None,
    table: PriceTable,
) -> Estimate:
    tier = table.tier_for(parameters)
    training_cost = Decimal(tokens) / MILLION * tier.usd_per_million_tokens
    growth_fee = Decimal(growth_parameters) / MILLION * table.growth_fee_per_million_parameters
    contraction_fee = tier.contraction_fee if with_contraction_fee else Decimal(0)
    total = max((training_cost + growth_fee + contraction_fee).quantize(CENT, rounding=ROUND_HALF_UP),
                table.minimum_charge_usd)
    instance = instance_type or tier.instance_type
    count = 1 if instance_type else tier.instance_count
    flop_count = _training_flops(tokens, parameters)
    if with_contraction_fee:
        flop_count += 2.0 * parameters * CONTRACT_FORWARD_TOKENS
    compute = _seconds(table, flop_count, instance, count)
    eta = table.startup_seconds + compute
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
    )


def estimate_train(
    settings: TrainSettings, base: ModelConfig, *, instance_type: str | None = None, table: PriceTable | None = None
) -> Estimate:
    """Price a train job: tokens at the tier of the grown model, plus the one-time growth fee."""
    table = table or price_table()
    grown = grown_config(base)
    return _estimate(
        "train",
        settings.training_tokens(),
        grown.parameters(),
        grown.parameters() - base.parameters(),
        False,
        instance_type,
        table,
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
    return _estimate(
        "contract", settings.training_tokens(), source.parameters(), 0, True, instance_type, table
    )


def bill(estimate: Estimate, tokens_trained: int) -> Decimal:
    """What a job pays for what actually ran: fees in full, training pro rata to tokens trained,
    and never less than the minimum charge.

    A completed job trained every estimated token, so its bill equals the estimate's total.
    """
    tokens = min(max(tokens_trained, 0), estimate.training_tokens)
    training = Decimal(tokens) / MILLION * estimate.usd_per_million_tokens
    total = (training + estimate.growth_fee + estimate.contraction_fee).quantize(CENT, rounding=ROUND_HALF_UP)
    return max(total, estimate.minimum_charge)
