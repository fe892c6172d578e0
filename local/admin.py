"""`fusion admin`: the operator's commands (the /admin routes; the token must be an operator's).

    fusion admin tenants                      every tenant's limit, spend and what remains
    fusion admin budget TENANT USD            give a tenant a spend limit of their own
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table

from shared.admin import TenantSpend, TenantSpendList


def add_parsers(sub: argparse._SubParsersAction) -> None:
    admin = sub.add_parser("admin", help="operators: every tenant's spend, a tenant's budget").add_subparsers(
        dest="action", required=True)
    admin.add_parser("tenants", help="every tenant's limit, spend and remaining budget")
    budget = admin.add_parser("budget", help="set a tenant's spend limit (USD)")
    budget.add_argument("tenant", help="the tenant as `fusion admin tenants` lists it")
    budget.add_argument("usd", help="the new limit, e.g. 250 or 250.00")


def spend_table(answer: TenantSpendList) -> Table:
    table = Table(title=f"tenants (default budget USD {answer.default_budget_usd})")
    for column in ("tenant", "limit", "spent", "remaining", "own budget"):
        table.add_column(column, justify="left" if column == "tenant" else "right")
    for t in answer.tenants:
        table.add_row(t.tenant, t.limit_usd, t.spent_usd, t.remaining_usd, t.budget_usd or "-")
    return table


def budget_line(answer: TenantSpend) -> str:
    return (f"{answer.tenant}: limit USD {answer.limit_usd}, spent USD {answer.spent_usd}, "
            f"remaining USD {answer.remaining_usd}")


def admin_tenants(args: argparse.Namespace, client: Any, out: Any) -> int:
    out.show(client.call("GET", "/admin/tenants", TenantSpendList), spend_table)
    return 0


def admin_budget(args: argparse.Namespace, client: Any, out: Any) -> int:
    from urllib.parse import quote

    answer = client.call("PUT", f"/admin/tenants/{quote(args.tenant, safe='')}/budget", TenantSpend,
                         {"budget_usd": args.usd})
    out.show(answer, budget_line)
    return 0


COMMANDS = {("admin", "tenants"): admin_tenants, ("admin", "budget"): admin_budget}
