"""The operators' API: every tenant's spend, a tenant's budget; operators only (403 for tenants),
under the AdminFunction's role; locally through `fusion serve`'s server and `fusion admin`."""

from __future__ import annotations

import json

import pytest

from local.server import api_event
from shared.admin import ADMIN_GROUP, GROUPS_CLAIM, is_admin
from shared.budgets import DEFAULT_BUDGET_USD
from tests.conftest import LambdaContext, http, unsigned_jwt

OPERATOR = {"sub": "ops", GROUPS_CLAIM: f"[{ADMIN_GROUP} other]"}  # how API Gateway hands a list claim on


@pytest.fixture
def admin(aws):
    from functions.admin import app

    app._tenants.cache_clear()

    def call(method: str, path: str, body=None, claims=OPERATOR):
        event = api_event(method, path, headers={"content-type": "application/json"},
                          body=json.dumps(body) if body is not None else None, claims=claims)
        result = app.lambda_handler(event, LambdaContext())
        return result["statusCode"], json.loads(result["body"])

    yield call
    app._tenants.cache_clear()


def test_the_groups_claim_is_read_as_a_list_or_as_api_gateways_string():
    assert is_admin({GROUPS_CLAIM: [ADMIN_GROUP]}) and is_admin({GROUPS_CLAIM: f"[{ADMIN_GROUP}]"})
    assert not is_admin({GROUPS_CLAIM: "[fusion-admins-not]"}) and not is_admin({"sub": "alice"}) and not is_admin(None)


def test_an_operator_sees_every_tenants_spend_and_sets_a_budget_that_admission_then_applies(aws, admin):
    from decimal import Decimal

    from shared.budgets import budget_of
    from shared.store import Tenants

    tenants = Tenants(session=aws.session)
    aws.session.client("dynamodb").put_item(TableName=aws.env["TENANTS_TABLE"], Item={
        "tenant": {"S": "alice"}, "spent_cents": {"N": "1234"}})  # what accepted jobs leave
    status, answer = admin("PUT", "/admin/tenants/bob/budget", {"budget_usd": "0.5"})
    assert status == 200, answer
    assert answer == {"tenant": "bob", "budget_usd": "0.50", "limit_usd": "0.50", "spent_usd": "0.00",
                      "remaining_usd": "0.50"}
    assert budget_of("bob", tenants=tenants).limit == Decimal("0.50")  # what admission reads
    status, listing = admin("GET", "/admin/tenants")
    assert status == 200 and listing["default_budget_usd"] == DEFAULT_BUDGET_USD
    assert [(t["tenant"], t["spent_usd"], t["limit_usd"], t["budget_usd"]) for t in listing["tenants"]] == [
        ("alice", "12.34", DEFAULT_BUDGET_USD, None), ("bob", "0.00", "0.50", "0.50")]


def test_a_tenant_is_refused_and_a_bad_budget_is_named(admin):
    status, body = admin("GET", "/admin/tenants", claims={"sub": "alice"})
    assert status == 403 and body["error"]["code"] == "forbidden"
    assert admin("PUT", "/admin/tenants/bob/budget", {"budget_usd": "1"}, claims={"sub": "alice"})[0] == 403
    for bad in ({"budget_usd": "-1"}, {"budget_usd": "1.234"}, {"budget_usd": "ten"}, {"usd": "1"}):
        status, body = admin("PUT", "/admin/tenants/bob/budget", bad)
        assert status == 422, (bad, body)
        assert body["error"]["details"], body


def test_the_local_server_routes_admin_and_the_cli_sets_and_lists(server, capsys):
    from local.cli import main

    assert main(["--api-url", server, "admin", "budget", "carol", "12.5"]) == 0
    assert "carol: limit USD 12.50" in capsys.readouterr().out
    assert main(["--api-url", server, "--json", "admin", "tenants"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert {t["tenant"]: t["budget_usd"] for t in listing["tenants"]} == {"carol": "12.50"}
    # a tenant's token on the local server is a tenant's: refused
    status, body = http(f"{server}/admin/tenants", token=unsigned_jwt({"sub": "alice"}))
    assert status == 403, body
