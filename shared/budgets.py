"""A tenant's spend limit, what is committed against it, and the answers that word it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from shared.errors import JobError
from shared.store import Tenants


# The spend limit of a tenant without a record of their own in the tenants table.
DEFAULT_BUDGET_ENV = "FUSION_DEFAULT_BUDGET_USD"
DEFAULT_BUDGET_USD = "100.00"
# A budget as operators write it (the template's DefaultBudgetUsd, the admin API): whole cents.
BUDGET_PATTERN = r"^[0-9]{1,9}(\.[0-9]{1,2})?$"


@dataclass(frozen=True)
class Budget:
    """A tenant's spend limit and what is already spent against it.

    Spent = the bills of ended jobs + the estimated totals of jobs not yet ended (queued, launching,
    running, cancelling): an estimate is committed the moment a job is accepted, and replaced by
    its bill (never more than the estimate) when the job ends. The tenants table keeps it as a
    counter (shared.store.Jobs moves it in the same transactions as the jobs), so reading it costs
    one item, however many jobs the tenant has.
    """

    limit: Decimal
    spent: Decimal

    @property
    def remaining(self) -> Decimal:
        return max(self.limit - self.spent, Decimal("0.00"))

    def allows(self, total: Decimal) -> bool:
        return total <= self.limit - self.spent

    def summary(self) -> dict[str, str]:
        return {"limit": str(self.limit), "spent": str(self.spent), "remaining": str(self.remaining)}


def default_budget() -> Decimal:
    return Decimal(os.environ.get(DEFAULT_BUDGET_ENV) or DEFAULT_BUDGET_USD)


def budget_of(owner: str, *, tenants: Tenants) -> Budget:
    """The tenant's limit (their record's budget_usd, else the default) and their committed spend."""
    record = tenants.get(owner) or {}
    limit = Decimal(record["budget_usd"]) if record.get("budget_usd") else default_budget()
    spent = Decimal(int(record.get("spent_cents", 0))) / 100
    return Budget(limit=limit, spent=spent.quantize(Decimal("0.01")))


def quote(job: dict[str, Any], budget: Budget) -> dict[str, Any]:
    """The estimate answer: the priced job and whether the tenant's budget lets it run."""
    allowed = budget.allows(Decimal(job["estimate"]["total"]))
    estimate = {**job["estimate"], "allowed_to_proceed": allowed, "remaining_budget": str(budget.remaining)}
    return {"type": job["type"], "model": job["model"], "dataset": job["dataset"], "settings": job["settings"],
            "estimate": estimate, "warnings": job["warnings"], "allowed_to_proceed": allowed,
            "budget": budget.summary()}


def check_budget(job: dict[str, Any], budget: Budget) -> None:
    """Refuse a job whose estimate would take its tenant past their spend limit (nothing is written)."""
    total = Decimal(job["estimate"]["total"])
    if not budget.allows(total):
        message = (f"this job is estimated at USD {total} but only USD {budget.remaining} of your budget of "
                   f"USD {budget.limit} remains (USD {budget.spent} spent or committed)")
        raise JobError(402, "budget_exceeded", message, [{"field": "estimate.total", "message": message}])
