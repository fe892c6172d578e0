"""Create Fusion's AWS resources from template.yaml against any endpoint (moto in tests and locally).

The tables, queues, buckets and bus are read from the template itself, and the functions'
environment comes from the template's Globals and functions, so the local stack, the tests and the deployed
stack cannot drift apart.
"""

from __future__ import annotations

from functools import lru_cache
from uuid import NAMESPACE_URL, uuid5
from pathlib import Path
from typing import Any

import yaml

from local.aws import LOCAL_ACCOUNT

TEMPLATE = Path(__file__).resolve().parent.parent / "template.yaml"


class _Tag:
    """An unresolved CloudFormation intrinsic (!Ref, !Sub, !GetAtt ...)."""

    def __init__(self, tag: str, value: Any):
        self.tag, self.value = tag, value

    def __repr__(self) -> str:
        return f"{self.tag} {self.value!r}"


class _CfnLoader(yaml.SafeLoader):
    pass


def _construct(loader: yaml.Loader, suffix: str, node: yaml.Node) -> _Tag:
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    return _Tag("!" + suffix, value)


_CfnLoader.add_multi_constructor("!", _construct)


def load_template(path: str | Path = TEMPLATE) -> dict[str, Any]:
    path = Path(path).resolve()
    return _parsed(str(path), path.stat().st_mtime_ns)


@lru_cache(maxsize=4)
def _parsed(path: str, mtime_ns: int) -> dict[str, Any]:
    return yaml.load(Path(path).read_text(), Loader=_CfnLoader)


def _resources(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {name: r.get("Properties", {}) for name, r in template["Resources"].items() if r["Type"] == kind}


def _table_spec(name: str, props: dict[str, Any]) -> dict[str, Any]:
    spec = {
        "TableName": name,
        "AttributeDefinitions": props["AttributeDefinitions"],
        "KeySchema": props["KeySchema"],
        "BillingMode": props.get("BillingMode", "PAY_PER_REQUEST"),
    }
    if props.get("GlobalSecondaryIndexes"):
        spec["GlobalSecondaryIndexes"] = props["GlobalSecondaryIndexes"]
    # SSESpecification is left to the deployed stack: locally it would only mint a KMS key per table.
    return spec


def pseudo_parameters(region: str, prefix: str = "fusion") -> dict[str, str]:
    """CloudFormation's pseudo parameters for a local stack named `prefix` (its id stable per name)."""
    return {"AWS::AccountId": LOCAL_ACCOUNT, "AWS::Region": region, "AWS::Partition": "aws",
            "AWS::StackName": prefix, "AWS::URLSuffix": "amazonaws.com",
            "AWS::StackId": f"arn:aws:cloudformation:{region}:{LOCAL_ACCOUNT}:stack/{prefix}/{uuid5(NAMESPACE_URL, prefix)}"}


def create_resources(session: Any, template_path: str | Path = TEMPLATE, *, prefix: str = "fusion") -> dict[str, str]:
    """Create every table, queue, bucket and bus the template declares; return the functions' env.

    Physical names are `<prefix>-<logical id>` (lower case for buckets) unless the template names
    the resource itself. The returned mapping is
    the functions' environment (function_environment) with each !Ref / !GetAtt / !Sub resolved to what
    was created here, ready to put into os.environ.
    """
    template = load_template(template_path)
    region = session.region_name
    refs: dict[str, str] = {}

    dynamodb = session.client("dynamodb")
    for logical, props in _resources(template, "AWS::DynamoDB::Table").items():
        name = f"{prefix}-{logical}"
        dynamodb.create_table(**_table_spec(name, props))
        if props.get("TimeToLiveSpecification", {}).get("Enabled"):
            ttl = props["TimeToLiveSpecification"]
            dynamodb.update_time_to_live(
                TableName=name, TimeToLiveSpecification={"AttributeName": ttl["AttributeName"], "Enabled": True}
            )
        refs[logical] = name

    sqs = session.client("sqs")
    for logical in _resources(template, "AWS::SQS::Queue"):
        refs[logical] = sqs.create_queue(QueueName=f"{prefix}-{logical}")["QueueUrl"]

    parameters = {name: str(p.get("Default", "")) for name, p in template.get("Parameters", {}).items()}
    pseudo = pseudo_parameters(region, prefix)
    s3 = session.client("s3")
    for logical, props in _resources(template, "AWS::S3::Bucket").items():
        given = props.get("BucketName")
        name = _resolve(given, {**parameters, **pseudo}, {}) if given else f"{prefix}-{logical}".lower()
        if region == "us-east-1":
            s3.create_bucket(Bucket=name)
        else:
            s3.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": region})
        if props.get("VersioningConfiguration", {}).get("Status") == "Enabled":  # datasets pin a version
            s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
        refs[logical] = name

    events = session.client("events")
    for logical in _resources(template, "AWS::Events::EventBus"):
        name = f"{prefix}-{logical}"
        events.create_event_bus(Name=name)
        refs[logical] = name

    atts = {
        "SageMakerExecutionRole.Arn": f"arn:aws:iam::{LOCAL_ACCOUNT}:role/{prefix}-SageMakerExecutionRole",
        "TrainingImageRepository.RepositoryUri": f"{LOCAL_ACCOUNT}.dkr.ecr.{region}.amazonaws.com/{prefix}-training",
    }
    # The sign-in resources (a Cognito user pool and its client) are not made locally: what names
    # them resolves empty, so the local console has no sign-in.
    for kind in ("AWS::Cognito::UserPool", "AWS::Cognito::UserPoolClient", "AWS::Cognito::UserPoolDomain"):
        refs.update({logical: "" for logical in _resources(template, kind)})
    names = {**parameters, **pseudo, **refs}
    conditions = {name: _condition(expr, names) for name, expr in template.get("Conditions", {}).items()}
    env = {}
    for var, value in function_environment(template).items():
        env[var] = _resolve(value, names, atts, conditions)
    return env


def function_environment(template: dict[str, Any]) -> dict[str, Any]:
    """The Globals' variables and those a function sets for itself: locally one process runs them all."""
    variables = dict(template["Globals"]["Function"]["Environment"]["Variables"])
    for props in _resources(template, "AWS::Serverless::Function").values():
        variables.update(props.get("Environment", {}).get("Variables", {}))
    return variables


def _condition(expr: Any, refs: dict[str, str]) -> bool:
    """A template condition (!Equals, !Not, !And, !Or over resolvable values), evaluated locally."""
    if expr.tag == "!Equals":
        left, right = (_resolve(v, refs, {}) for v in expr.value)
        return left == right
    if expr.tag == "!Not":
        return not _condition(expr.value[0], refs)
    if expr.tag in ("!And", "!Or"):
        results = [_condition(e, refs) for e in expr.value]
        return all(results) if expr.tag == "!And" else any(results)
    raise ValueError(f"cannot evaluate the condition {expr!r} locally")


def _resolve(value: Any, refs: dict[str, str], atts: dict[str, str], conditions: dict[str, bool] | None = None) -> Any:
    if not isinstance(value, _Tag):
        return value if isinstance(value, list) else str(value)
    if value.tag == "!Ref":
        return refs[value.value]
    if value.tag == "!GetAtt":
        return atts[value.value if isinstance(value.value, str) else ".".join(value.value)]
    if value.tag == "!Sub":
        text, variables = (value.value, {}) if isinstance(value.value, str) else value.value
        local = {name: _resolve(v, refs, atts) for name, v in variables.items()}
        for name, resolved in {**refs, **atts, **local}.items():
            text = text.replace("${" + name + "}", resolved)
        return text
    if value.tag == "!Select":
        index, items = value.value
        return _resolve(items, refs, atts)[int(index)]
    if value.tag == "!Split":
        separator, text = value.value
        return _resolve(text, refs, atts).split(separator)
    if value.tag == "!Join":
        separator, items = value.value
        resolved = _resolve(items, refs, atts)
        return separator.join(resolved if isinstance(resolved, list) else [resolved])
    if value.tag == "!If" and conditions is not None:
        name, when_true, when_false = value.value
        return _resolve(when_true if conditions[name] else when_false, refs, atts, conditions)
    raise ValueError(f"cannot resolve {value!r} locally")
