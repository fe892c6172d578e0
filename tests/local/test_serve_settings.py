"""`fusion serve` takes the operator's default budget from its environment (the template's default
fills in when it is unset), and serves the operators' routes."""

from __future__ import annotations

import os

import requests

from local.stack import LocalStack
from shared.budgets import DEFAULT_BUDGET_ENV, DEFAULT_BUDGET_USD


def test_the_default_budget_from_the_environment_stands_and_the_admin_routes_serve(tmp_path, monkeypatch):
    monkeypatch.setenv(DEFAULT_BUDGET_ENV, "7.25")
    with LocalStack(base_sizes=(), runs_dir=tmp_path, home=tmp_path, stop_grace_seconds=5) as stack:
        assert stack.env[DEFAULT_BUDGET_ENV] == os.environ[DEFAULT_BUDGET_ENV] == "7.25"
        listing = requests.get(f"{stack.api_url}/admin/tenants", timeout=30)
        assert listing.status_code == 200 and listing.json()["default_budget_usd"] == "7.25"
    assert os.environ[DEFAULT_BUDGET_ENV] == "7.25"  # as it was before the stack


def test_without_it_the_templates_default_applies(monkeypatch):
    import boto3
    from moto import mock_aws

    from local.resources import create_resources

    monkeypatch.delenv(DEFAULT_BUDGET_ENV, raising=False)
    with mock_aws():
        env = create_resources(boto3.session.Session(region_name="us-east-1"))
    assert env[DEFAULT_BUDGET_ENV] == DEFAULT_BUDGET_USD


def test_a_second_stack_in_the_same_process_starts_on_empty_resources(tmp_path):
    """moto keeps its backends per process: the second stack must not find the first one's tables."""
    import boto3

    for run in ("first", "second"):
        with LocalStack(base_sizes=(), runs_dir=tmp_path / run, home=tmp_path, stop_grace_seconds=5) as stack:
            jobs = boto3.session.Session(region_name="us-east-1").resource("dynamodb").Table(stack.env["JOBS_TABLE"])
            assert jobs.scan()["Items"] == []
            jobs.put_item(Item={"job_id": f"j-{run}", "owner": "alice", "status": "pending"})
