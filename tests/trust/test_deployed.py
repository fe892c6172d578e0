"""A deployed stack is usable: what moto and the local stack never show (a catalog nobody seeded,
the README's deploy steps, browsers' CORS, bucket names, throttling, log retention)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from local.resources import load_template
from local.sam import transformed
from shared.pricing import price_table
from shared.shapes import SIZES
from shared.store import BASE_PREFIX, PUBLIC_OWNER

ROOT = Path(__file__).resolve().parents[2]


def _deploy_steps() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme[readme.index("## Deploying to AWS"):].split("\n## ", 1)[0]


def test_get_models_lists_every_base_model_though_the_table_holds_none(aws, api):
    ddb = aws.session.client("dynamodb")
    for model_id in (f"{BASE_PREFIX}{size}" for size in SIZES):  # as in AWS: nothing seeds the catalog
        ddb.delete_item(TableName=aws.env["MODELS_TABLE"], Key={"model_id": {"S": model_id}})
    status, body = api("GET", "/models")
    assert status == 200
    assert {m["model_id"] for m in body["models"] if m["owner"] == PUBLIC_OWNER} == {f"{BASE_PREFIX}{s}" for s in SIZES}
    assert api("GET", f"/models/{BASE_PREFIX}tiny")[0] == 200


def test_the_readme_deploys_in_order_and_uploads_every_size_it_offers():
    steps = _deploy_steps()
    order = ["sam deploy", "ecr get-login-password", "docker login", "docker push", "aws s3 cp"]
    positions = [steps.index(step) for step in order]
    assert positions == sorted(positions), dict(zip(order, positions))
    loop = re.search(r"for size in ([a-z ]+); do", steps)
    assert loop and set(loop.group(1).split()) == set(SIZES)
    outputs = load_template()["Outputs"]
    for name in re.findall(r"\$\(out (\w+)\)", steps) + re.findall(r"output `(\w+)`", steps):
        assert name in outputs, f"the README reads stack output {name}, which template.yaml does not have"
    instances = {instance for tier in price_table().tiers for instance in tier.instance_types}
    assert all(instance in steps for instance in instances), "the quota note names every instance type jobs use"
    assert "Service Quotas" in steps


def _data_bucket_name(template: dict) -> str:
    return json.dumps(template["Resources"]["DataBucket"]["Properties"]["BucketName"], sort_keys=True)


def test_the_data_bucket_is_one_per_stack_and_named_alike_everywhere():
    template = transformed()
    name = template["Resources"]["DataBucket"]["Properties"]["BucketName"]
    assert "AWS::StackId" in json.dumps(name)  # not only prefix, account and region: a redeploy collides
    for function, resource in template["Resources"].items():
        if resource["Type"] == "AWS::Lambda::Function":
            variables = resource["Properties"]["Environment"]["Variables"]
            assert json.dumps(variables["DATA_BUCKET"], sort_keys=True) == _data_bucket_name(template), function
    assert "BucketName" not in template["Resources"]["ArtifactsBucket"]["Properties"]  # CloudFormation names it
    text, variables = name["Fn::Sub"]
    longest = text.replace("${NamePrefix}", "x" * 20).replace("${AWS::AccountId}", "0" * 12) \
        .replace("${AWS::Region}", "ap-southeast-5").replace("${StackTag}", "0" * 8)
    assert len(longest) <= 63, longest
    prefix = load_template()["Parameters"]["NamePrefix"]["AllowedPattern"]
    assert prefix.endswith("{1,20}$")


def test_no_route_takes_a_browsers_preflight_to_the_authorizer_and_uploads_may_cross_origins():
    resources = load_template()["Resources"]
    routes = [e["Properties"] for r in resources.values() if r["Type"] == "AWS::Serverless::Function"
              for e in r["Properties"].get("Events", {}).values() if e["Type"] == "HttpApi"]
    assert routes and all(route["Method"].upper() not in ("ANY", "OPTIONS") for route in routes)
    cors = resources["HttpApi"]["Properties"]["CorsConfiguration"]
    assert "authorization" in cors["AllowHeaders"] and "OPTIONS" in cors["AllowMethods"]
    [rule] = resources["DataBucket"]["Properties"]["CorsConfiguration"]["CorsRules"]
    assert rule["AllowedMethods"] == ["PUT"] and "content-type" in rule["AllowedHeaders"]
    assert repr(rule["AllowedOrigins"]) == repr(cors["AllowOrigins"])  # one parameter for both


def test_the_api_is_throttled_and_every_function_logs_with_a_retention():
    template = transformed()
    resources = template["Resources"]
    stage = next(r["Properties"] for r in resources.values() if r["Type"] == "AWS::ApiGatewayV2::Stage")
    throttle = stage["DefaultRouteSettings"]
    assert throttle["ThrottlingBurstLimit"] > 0 and throttle["ThrottlingRateLimit"] > 0
    for name, resource in resources.items():
        if resource["Type"] == "AWS::Lambda::Function":
            group = resource["Properties"]["LoggingConfig"]["LogGroup"]["Ref"]
            assert resources[group]["Properties"]["RetentionInDays"] > 0, name
    assert all(r["Properties"].get("RetentionInDays") for r in resources.values() if r["Type"] == "AWS::Logs::LogGroup")


def test_only_the_events_rules_may_dead_letter_and_failed_async_invocations_are_kept():
    resources = transformed()["Resources"]
    [statement] = resources["EventsDeadLetterQueuePolicy"]["Properties"]["PolicyDocument"]["Statement"]
    sources = statement["Condition"]["ArnEquals"]["aws:SourceArn"]
    rules = {name for name, r in resources.items() if r["Type"] == "AWS::Events::Rule"
             and any(t["Arn"] == {"Fn::GetAtt": ["EventsFunction", "Arn"]} for t in r["Properties"]["Targets"])}
    assert {s["Fn::GetAtt"][0] for s in sources} == rules and len(rules) == 2
    invoke = next(r["Properties"] for r in resources.values() if r["Type"] == "AWS::Lambda::EventInvokeConfig"
                  and r["Properties"]["FunctionName"] == {"Ref": "EventsFunction"})
    assert invoke["MaximumRetryAttempts"] == 2
    assert invoke["DestinationConfig"]["OnFailure"]["Destination"] == {"Fn::GetAtt": ["EventsDeadLetterQueue", "Arn"]}
    schedule = next(r["Properties"] for r in resources.values() if r["Type"] == "AWS::Scheduler::Schedule")
    assert schedule["Target"]["Arn"] == {"Fn::GetAtt": ["ReconcilerFunction", "Arn"]}
