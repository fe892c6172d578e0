"""Create Fusion's AWS resources from template.yaml against any endpoint (moto in tests and locally).

The tables, queues, buckets and bus are read from the template itself, and the functions'
environment comes from the template's Globals, so the local stack, the tests and the deployed
stack cannot drift apart.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

TEMPLATE = Path(__file__).resolve().parent.parent / "template.yaml"
LOCAL_ACCOUNT = "123456789012"


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


def create_resources(session: Any, template_path: str | Path = TEMPLATE, *, prefix: str = "fusion") -> dict[str, str]:
    """Create every table, queue, bucket and bus the template declares; return the functions' env.

    Physical names are `<prefix>-<logical id>` (lower case for buckets) unless the template names
    the resource itself. The returned mapping is
    the template's Globals.Function.Environment with each !Ref / !GetAtt / !Sub resolved to what
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
    pseudo = {"AWS::AccountId": LOCAL_ACCOUNT, "AWS::Region": region, "AWS::Partition": "aws",
              "AWS::StackName": prefix, "AWS::URLSuffix": "amazonaws.com"}
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
    env = {}
    for var, value in template["Globals"]["Function"]["Environment"]["Variables"].items():
        env[var] = _resolve(value, {**parameters, **pseudo, **refs}, atts)
    return env


def _resolve(value: Any, refs: dict[str, str], atts: dict[str, str]) -> str:
    if not isinstance(value, _Tag):
        return str(value)
    if value.tag == "!Ref":
        return refs[value.value]
    if value.tag == "!GetAtt":
        return atts[value.value if isinstance(value.value, str) else ".".join(value.value)]
    if value.tag == "!Sub":
        text = value.value
        for name, resolved in {**refs, **atts}.items():
            text = text.replace("${" + name + "}", resolved)
        return text
    raise ValueError(f"cannot resolve {value!r} locally")
