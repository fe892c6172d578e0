"""The operators' view of tenants: every tenant's spend against their limit, and a tenant's budget.

Operators are the members of one group of the identity provider, named in the JWT's groups claim
(Cognito's `cognito:groups`; the stack's user pool has the group). API Gateway's HTTP API hands a
list-valued claim to the function as one string, "[a b]": both shapes are read.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from shared.budgets import BUDGET_PATTERN, budget_of, default_budget
from shared.store import Tenants

ADMIN_GROUP = "fusion-admins"
GROUPS_CLAIM = "cognito:groups"


def is_admin(claims: dict[str, Any] | None) -> bool:
    groups = (claims or {}).get(GROUPS_CLAIM)
    if isinstance(groups, str):
        groups = groups.strip().removeprefix("[").removesuffix("]").replace(",", " ").split()
    return isinstance(groups, list) and ADMIN_GROUP in groups


class TenantSpend(BaseModel):
    """One tenant's limit and spend (USD, decimal strings)."""

    tenant: str = Field(description="The tenant's owner value (its sub, encoded), as the tenants table keys it")
    budget_usd: str | None = Field(description="The tenant's own limit; null: the stack's default applies")
    limit_usd: str = Field(description="The limit in force: budget_usd, else the default")
    spent_usd: str = Field(description="Bills of ended jobs plus the estimates of jobs not yet ended")
    remaining_usd: str


class TenantSpendList(BaseModel):
    default_budget_usd: str
    tenants: list[TenantSpend]


class SetBudgetRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    budget_usd: Annotated[str, Field(pattern=BUDGET_PATTERN, description="USD, at most two decimals")]


def _spend(tenant: str, tenants: Tenants) -> TenantSpend:
    budget = budget_of(tenant, tenants=tenants)
    record = tenants.get(tenant) or {}
    return TenantSpend(tenant=tenant, budget_usd=record.get("budget_usd"), limit_usd=str(budget.limit),
                       spent_usd=str(budget.spent), remaining_usd=str(budget.remaining))


def tenant_spend(tenants: Tenants) -> TenantSpendList:
    """Every tenant with a record (a budget of their own, or any job accepted), by spend, highest first."""
    rows = []
    for record in tenants.all():
        rows.append(_spend(record["tenant"], _Known(record)))
    rows.sort(key=lambda r: (-Decimal(r.spent_usd), r.tenant))
    return TenantSpendList(default_budget_usd=str(default_budget()), tenants=rows)


def set_budget(tenant: str, request: SetBudgetRequest, tenants: Tenants) -> TenantSpend:
    record = tenants.set_budget(tenant, str(Decimal(request.budget_usd).quantize(Decimal("0.01"))))
    return _spend(tenant, _Known(record))


class _Known:
    """A tenants store that answers from a record already read (the scan's), without a request."""

    def __init__(self, record: dict[str, Any]):
        self.record = record

    def get(self, tenant: str) -> dict[str, Any] | None:
        return self.record
