"""Facts that template.yaml and the code both state, tied: the code's copy is the template's."""

from __future__ import annotations

import re

from local.aws import LOCAL_ACCOUNT
from local.resources import TEMPLATE as TEMPLATE_PATH, load_template
from local.server import API_TIMEOUT_S
from shared.budgets import DEFAULT_BUDGET_ENV, DEFAULT_BUDGET_USD
from shared.store import BY_OWNER_INDEX, BY_STATUS_INDEX

TEMPLATE = load_template()


def _functions() -> dict[str, dict]:
    return {name: r["Properties"] for name, r in TEMPLATE["Resources"].items() if r["Type"] == "AWS::Serverless::Function"}


def test_the_default_budget_is_the_templates():
    parameter = TEMPLATE["Parameters"]["DefaultBudgetUsd"]
    assert parameter["Default"] == DEFAULT_BUDGET_USD
    variables = TEMPLATE["Globals"]["Function"]["Environment"]["Variables"]
    assert variables[DEFAULT_BUDGET_ENV].value == "DefaultBudgetUsd"  # a !Ref of the parameter


def test_every_index_is_one_the_stores_query():
    tables = {name: r["Properties"] for name, r in TEMPLATE["Resources"].items() if r["Type"] == "AWS::DynamoDB::Table"}
    indexes = {name: [i["IndexName"] for i in props.get("GlobalSecondaryIndexes", [])] for name, props in tables.items()}
    assert {name: names for name, names in indexes.items() if names} == {
        "JobsTable": [BY_OWNER_INDEX, BY_STATUS_INDEX], "ModelsTable": [BY_OWNER_INDEX], "DatasetsTable": [BY_OWNER_INDEX]}
    granted = re.findall(r"/index/([\w-]+)", TEMPLATE_PATH.read_text())  # the roles' grants name them too
    assert granted and set(granted) == {BY_OWNER_INDEX, BY_STATUS_INDEX}


def test_the_local_account_is_motos_and_the_local_api_times_out_as_deployed():
    from moto.core import DEFAULT_ACCOUNT_ID

    assert LOCAL_ACCOUNT == DEFAULT_ACCOUNT_ID
    api = _functions()["ApiFunction"]
    assert api.get("Timeout", TEMPLATE["Globals"]["Function"]["Timeout"]) == API_TIMEOUT_S


def test_launch_attempts_are_the_templates_and_the_queue_outlasts_them():
    from shared.launching import DEFAULT_MAX_LAUNCH_ATTEMPTS, MAX_LAUNCH_ATTEMPTS_ENV

    parameter = TEMPLATE["Parameters"]["MaxLaunchAttempts"]
    assert parameter["Default"] == DEFAULT_MAX_LAUNCH_ATTEMPTS
    variables = TEMPLATE["Globals"]["Function"]["Environment"]["Variables"]
    assert variables[MAX_LAUNCH_ATTEMPTS_ENV].value == "MaxLaunchAttempts"
    # the launcher fails the job on its last attempt, before the queue gives the message up
    redrive = TEMPLATE["Resources"]["LaunchQueue"]["Properties"]["RedrivePolicy"]
    assert redrive["maxReceiveCount"] == parameter["MaxValue"] + 1


def test_the_training_precision_is_the_containers_setting():
    from shared.contracts import PRECISION_ENV, PRECISIONS

    parameter = TEMPLATE["Parameters"]["TrainingPrecision"]
    assert parameter["AllowedValues"] == list(PRECISIONS) and parameter["Default"] == "auto"
    variables = TEMPLATE["Globals"]["Function"]["Environment"]["Variables"]
    assert variables[PRECISION_ENV].value == "TrainingPrecision"
