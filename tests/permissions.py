"""The handlers under the roles template.yaml gives them: every boto3 call a function makes is
turned into the IAM requests AWS would evaluate (action, resource, condition keys) and checked
against that function's role as the SAM transform writes it (policy templates expanded).

A call the role does not allow is answered AccessDenied, as AWS would, and recorded; the `aws`
fixture fails the test on any. S3 answers a missing key with AccessDenied, not NoSuchKey, to a
caller without s3:ListBucket on the bucket: the calls are answered that way here too.

Which function makes a call is read off the Python stack: the innermost frame of a module under
a function's package (functions/<name>/) names it, so test setup and local plumbing are not
checked, and every handler is, whichever test drives it.
"""

from __future__ import annotations

import fnmatch
import os
import re
import sys
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any
from urllib.parse import urlparse

import botocore.session
from botocore.awsrequest import AWSResponse

from local.resources import LOCAL_ACCOUNT, TEMPLATE, function_environment, load_template, pseudo_parameters
from local.sam import transformed

PARTITION = "aws"


@dataclass(frozen=True)
class Request:
    """One IAM authorization request: what AWS evaluates for (a part of) one API call."""

    action: str
    resource: str
    context: tuple[tuple[str, str], ...] = ()


@dataclass
class Call:
    function: str
    operation: str
    requests: list[Request]
    denied: list[Request] = field(default_factory=list)


# --- the roles -------------------------------------------------------------------------------


def function_roles(template: dict[str, Any]) -> dict[str, str]:
    """Function logical id -> logical id of its role, from the transformed template."""
    out = {}
    for name, resource in template["Resources"].items():
        if resource["Type"] == "AWS::Lambda::Function":
            role = resource["Properties"]["Role"]
            out[name] = role["Fn::GetAtt"][0] if isinstance(role["Fn::GetAtt"], list) else role["Fn::GetAtt"].split(".")[0]
    return out


def handler_packages(template: dict[str, Any]) -> dict[str, str]:
    """Python package of each function's handler (functions.api) -> function logical id."""
    out = {}
    for name, resource in template["Resources"].items():
        if resource["Type"] == "AWS::Serverless::Function":
            out[".".join(resource["Properties"]["Handler"].split(".")[:2])] = name
    return out


def role_statements(template: dict[str, Any], role: str) -> list[dict[str, Any]]:
    """The statements of a role's inline policies (unresolved intrinsics), but for those SAM adds
    for an asynchronous invocation's destination and those of SERVICE_STATEMENTS: Lambda itself
    uses them, never the code."""
    props = template["Resources"][role]["Properties"]
    statements = []
    for policy in props.get("Policies", []):
        if "EventInvokeConfig" in policy.get("PolicyName", ""):
            continue
        document = policy["PolicyDocument"]
        body = document.get("Statement", [])
        statements += body if isinstance(body, list) else [body]
    return [s for s in statements if s.get("Sid") not in SERVICE_STATEMENTS]


# Statements Lambda itself uses with a function's role, never the function's code: an event source
# mapping polling its queue.
SERVICE_STATEMENTS = {"PollLaunchQueue"}


class Resolver:
    """Resolves the transformed template's intrinsics to the names the functions' environment holds."""

    def __init__(self, template: dict[str, Any], env: dict[str, str], region: str):
        self.template, self.region = template, region
        sam = load_template(TEMPLATE)
        self.parameters = {n: str(p.get("Default", "")) for n, p in sam.get("Parameters", {}).items()}
        self.pseudo = pseudo_parameters(region)
        self.refs: dict[str, str] = {}
        for var, value in function_environment(sam).items():
            if getattr(value, "tag", None) == "!Ref" and var in env:
                self.refs[value.value] = env[var]
        self.role_arn = env.get("SAGEMAKER_ROLE_ARN", "")
        self.image_uri = env.get("TRAINING_IMAGE_URI", "")

    def __call__(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self(v) for v in value]
        if not isinstance(value, dict):
            return value
        if len(value) != 1:
            return {k: self(v) for k, v in value.items()}
        (fn, arg), = value.items()
        if fn == "Ref":
            return self.ref(arg)
        if fn == "Fn::GetAtt":
            logical, att = arg if isinstance(arg, list) else arg.split(".", 1)
            return self.get_att(logical, att)
        if fn == "Fn::Sub":
            text, variables = (arg, {}) if isinstance(arg, str) else arg
            variables = {k: self(v) for k, v in variables.items()}

            def sub(match: re.Match) -> str:
                name = match.group(1)
                if name in variables:
                    return str(variables[name])
                if "." in name:
                    return str(self.get_att(*name.split(".", 1)))
                return str(self.ref(name))

            return re.sub(r"\$\{([^}!]+)\}", sub, text)
        if fn == "Fn::Join":
            sep, parts = arg
            return sep.join(str(p) for p in self(parts))
        if fn == "Fn::Select":
            index, items = arg
            return self(items)[int(self(index))]
        if fn == "Fn::Split":
            sep, text = arg
            return str(self(text)).split(sep)
        if fn == "Fn::If":
            return self(arg[1])  # no condition of the template guards a permission
        return {fn: self(arg)}

    def ref(self, name: str) -> str:
        if name in self.pseudo:
            return self.pseudo[name]
        if name in self.parameters:
            return self.parameters[name]
        if name in self.refs:
            return self.refs[name]
        given = self.template["Resources"].get(name, {}).get("Properties", {}).get("BucketName")
        return str(self(given)) if given else f"unresolved-{name}"

    def get_att(self, logical: str, att: str) -> str:
        kind = self.template["Resources"].get(logical, {}).get("Type", "")
        name = self.ref(logical)
        account, region = LOCAL_ACCOUNT, self.region
        if kind == "AWS::SQS::Queue":
            queue = name.rstrip("/").rsplit("/", 1)[-1]
            return queue if att == "QueueName" else f"arn:{PARTITION}:sqs:{region}:{account}:{queue}"
        if kind == "AWS::DynamoDB::Table":
            return f"arn:{PARTITION}:dynamodb:{region}:{account}:table/{name}"
        if kind == "AWS::S3::Bucket":
            return f"arn:{PARTITION}:s3:::{name}"
        if kind == "AWS::Events::EventBus":
            return f"arn:{PARTITION}:events:{region}:{account}:event-bus/{name}"
        if logical == "SageMakerExecutionRole" and self.role_arn:
            return self.role_arn
        if kind == "AWS::ECR::Repository" and self.image_uri:  # <account>.dkr.ecr.<region>.<suffix>/<name>:<tag>
            registry, repository = self.image_uri.rsplit(":", 1)[0].split("/", 1)
            return f"arn:{PARTITION}:ecr:{registry.split('.')[3]}:{registry.split('.')[0]}:repository/{repository}"
        return f"arn:{PARTITION}:unresolved:{region}:{account}:{logical}"


# --- evaluation -------------------------------------------------------------------------------


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _like(pattern: str, value: str, *, case: bool = True) -> bool:
    if not case:
        pattern, value = pattern.lower(), value.lower()
    return fnmatch.fnmatchcase(value, pattern.replace("[", "[[]"))


def _conditions_hold(condition: dict[str, Any], context: dict[str, str]) -> bool:
    for operator, tests in condition.items():
        if_exists = operator.endswith("IfExists")  # a key the request lacks passes
        operator = operator.removesuffix("IfExists")
        for key, expected in tests.items():
            actual = context.get(key)
            if actual is None:
                if if_exists:
                    continue
                return False
            expected = [str(e) for e in _listed(expected)]
            if operator in ("StringEquals", "ArnEquals"):
                ok = actual in expected
            elif operator in ("StringLike", "ArnLike"):
                ok = any(_like(e, actual) for e in expected)
            elif operator == "Bool":
                ok = actual.lower() in [e.lower() for e in expected]
            else:
                raise NotImplementedError(f"condition operator {operator}")
            if not ok:
                return False
    return True


def matches(statement: dict[str, Any], request: Request) -> bool:
    actions = _listed(statement.get("Action", []))
    resources = _listed(statement.get("Resource", []))
    if not any(_like(a, request.action, case=False) for a in actions):
        return False
    if not any(_like(str(r), request.resource) for r in resources):
        return False
    return _conditions_hold(statement.get("Condition", {}), dict(request.context))


def allowed(statements: list[dict[str, Any]], request: Request) -> bool:
    hits = [s for s in statements if matches(s, request)]
    return any(s["Effect"] == "Allow" for s in hits) and not any(s["Effect"] == "Deny" for s in hits)


# --- boto3 calls as IAM requests -------------------------------------------------------------


def _table(region: str, name: str, index: str | None = None) -> str:
    arn = f"arn:{PARTITION}:dynamodb:{region}:{LOCAL_ACCOUNT}:table/{name}"
    return f"{arn}/index/{index}" if index else arn


def _queue(region: str, url_or_name: str) -> str:
    name = urlparse(url_or_name).path.rstrip("/").rsplit("/", 1)[-1] if "/" in url_or_name else url_or_name
    return f"arn:{PARTITION}:sqs:{region}:{LOCAL_ACCOUNT}:{name}"


def _bus(region: str, name: str | None) -> str:
    name = name or "default"
    return name if name.startswith("arn:") else f"arn:{PARTITION}:events:{region}:{LOCAL_ACCOUNT}:event-bus/{name}"


def _training_job(region: str, name: str) -> str:
    return f"arn:{PARTITION}:sagemaker:{region}:{LOCAL_ACCOUNT}:training-job/{name.lower()}"


def _tuning_job(region: str, name: str) -> str:
    return f"arn:{PARTITION}:sagemaker:{region}:{LOCAL_ACCOUNT}:hyper-parameter-tuning-job/{name.lower()}"


# The tags SageMaker holds for each job created through a recorded call: what aws:ResourceTag/<key>
# reads when a later call describes or stops it. A tuning's trials (<tuning>-NNN-<8 hex>) carry the
# tuning's tags. Other resources (endpoints, jobs created elsewhere) are asked of the service.
_SAGEMAKER_TAGS: dict[str, dict[str, str]] = {}
_TRIAL = re.compile(r"^(?P<tuning>.+)-\d{3}-[0-9a-z]{8}$")


def _request_tags(arn: str, params: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    tags = {t["Key"]: t["Value"] for t in params.get("Tags") or []}
    _SAGEMAKER_TAGS[arn] = tags
    return tuple((f"aws:RequestTag/{k}", v) for k, v in tags.items())


def _tag_context(arn: str, region: str) -> tuple[tuple[str, str], ...]:
    return tuple((f"aws:ResourceTag/{k}", v) for k, v in _resource_tags(arn, region).items())


_DYNAMODB_ITEM_CALLS = {"GetItem", "PutItem", "UpdateItem", "DeleteItem", "Query", "Scan", "DescribeTable"}
_TRANSACT = {"Put": "PutItem", "Update": "UpdateItem", "Delete": "DeleteItem", "ConditionCheck": "ConditionCheckItem",
             "Get": "GetItem"}
_S3_OBJECT_CALLS = {"GetObject": "GetObject", "HeadObject": "GetObject", "PutObject": "PutObject",
                    "DeleteObject": "DeleteObject", "CreateMultipartUpload": "PutObject", "UploadPart": "PutObject",
                    "CompleteMultipartUpload": "PutObject", "AbortMultipartUpload": "AbortMultipartUpload"}
_S3_BUCKET_CALLS = {"ListObjectsV2": "ListBucket", "ListObjects": "ListBucket", "HeadBucket": "ListBucket"}


def requests_of(service: str, operation: str, params: dict[str, Any], region: str) -> list[Request]:
    """The IAM requests AWS evaluates for one API call (those of each item of a transaction)."""
    if service == "dynamodb":
        if operation in _DYNAMODB_ITEM_CALLS:
            return [Request(f"dynamodb:{operation}", _table(region, params["TableName"], params.get("IndexName")))]
        if operation in ("TransactWriteItems", "TransactGetItems"):
            out = []
            for item in params["TransactItems"]:
                (kind, body), = item.items()
                out.append(Request(f"dynamodb:{_TRANSACT[kind]}", _table(region, body["TableName"])))
            return out
        if operation in ("BatchWriteItem", "BatchGetItem"):
            return [Request(f"dynamodb:{operation}", _table(region, t)) for t in params["RequestItems"]]
    if service == "s3":
        if operation in _S3_OBJECT_CALLS:
            action = _S3_OBJECT_CALLS[operation]
            if action == "GetObject" and params.get("VersionId"):
                action = "GetObjectVersion"
            return [Request(f"s3:{action}", f"arn:{PARTITION}:s3:::{params['Bucket']}/{params['Key']}")]
        if operation == "CopyObject":  # read the source, write the destination
            source = params["CopySource"]
            bucket, key = (source["Bucket"], source["Key"]) if isinstance(source, dict) else \
                source.lstrip("/").split("?")[0].split("/", 1)
            return [Request("s3:GetObject", f"arn:{PARTITION}:s3:::{bucket}/{key}"),
                    Request("s3:PutObject", f"arn:{PARTITION}:s3:::{params['Bucket']}/{params['Key']}")]
        if operation in _S3_BUCKET_CALLS:
            listed = (("s3:prefix", params["Prefix"]),) if "Prefix" in params else ()
            return [Request(f"s3:{_S3_BUCKET_CALLS[operation]}", f"arn:{PARTITION}:s3:::{params['Bucket']}", listed)]
    if service == "sqs":
        if operation in ("SendMessage", "SendMessageBatch"):
            return [Request("sqs:SendMessage", _queue(region, params["QueueUrl"]))]
        if operation in ("ReceiveMessage", "DeleteMessage", "ChangeMessageVisibility", "GetQueueAttributes"):
            return [Request(f"sqs:{operation}", _queue(region, params["QueueUrl"]))]
        if operation == "GetQueueUrl":
            return [Request("sqs:GetQueueUrl", _queue(region, params["QueueName"]))]
    if service == "events" and operation == "PutEvents":
        return [Request("events:PutEvents", _bus(region, e.get("EventBusName"))) for e in params["Entries"]]
    if service == "sagemaker":
        if operation == "CreateTrainingJob":
            job = _training_job(region, params["TrainingJobName"])
            tags = _request_tags(job, params)
            out = [Request("sagemaker:CreateTrainingJob", job, tags),
                   Request("iam:PassRole", params["RoleArn"], (("iam:PassedToService", "sagemaker.amazonaws.com"),))]
            if params.get("Tags"):
                out.append(Request("sagemaker:AddTags", job, tags))
            return out
        if operation in ("DescribeTrainingJob", "StopTrainingJob"):
            job = _training_job(region, params["TrainingJobName"])
            return [Request(f"sagemaker:{operation}", job, _tag_context(job, region))]
        if operation == "CreateHyperParameterTuningJob":
            tuning = _tuning_job(region, params["HyperParameterTuningJobName"])
            role = params["TrainingJobDefinition"]["RoleArn"]
            tags = _request_tags(tuning, params)
            out = [Request("sagemaker:CreateHyperParameterTuningJob", tuning, tags),
                   Request("iam:PassRole", role, (("iam:PassedToService", "sagemaker.amazonaws.com"),))]
            if params.get("Tags"):
                out.append(Request("sagemaker:AddTags", tuning, tags))
            return out
        if operation in ("DescribeHyperParameterTuningJob", "StopHyperParameterTuningJob",
                         "ListTrainingJobsForHyperParameterTuningJob"):
            tuning = _tuning_job(region, params["HyperParameterTuningJobName"])
            return [Request(f"sagemaker:{operation}", tuning, _tag_context(tuning, region))]
        if operation == "ListTrainingJobs":
            return [Request("sagemaker:ListTrainingJobs", "*")]
    if service == "sagemaker-runtime" and operation == "InvokeEndpoint":
        endpoint = f"arn:{PARTITION}:sagemaker:{region}:{LOCAL_ACCOUNT}:endpoint/{params['EndpointName'].lower()}"
        return [Request("sagemaker:InvokeEndpoint", endpoint, _tag_context(endpoint, region))]
    if service == "cloudwatch":
        if operation == "PutMetricData":
            return [Request("cloudwatch:PutMetricData", "*", (("cloudwatch:namespace", params["Namespace"]),))]
        if operation in ("GetMetricData", "GetMetricStatistics", "ListMetrics"):
            return [Request(f"cloudwatch:{operation}", "*")]
    raise NotImplementedError(f"no IAM mapping for {service}:{operation}: add it to tests/permissions.py")


_LOOKUP = threading.local()


def _resource_tags(arn: str, region: str) -> dict[str, str]:
    """The tags AWS evaluates with a request on `arn` (aws:ResourceTag/...): those it was created
    with through a recorded call (a trial: its tuning's), else asked of the service that holds it
    (moto, or the local stack's SageMaker), unchecked; none for a missing resource."""
    import boto3

    if arn in _SAGEMAKER_TAGS:
        return _SAGEMAKER_TAGS[arn]
    trial = _TRIAL.match(arn.rsplit("/", 1)[-1])
    if trial and ":training-job/" in arn:
        tuning = arn.split(":training-job/")[0] + ":hyper-parameter-tuning-job/" + trial["tuning"]
        if tuning in _SAGEMAKER_TAGS:
            return _SAGEMAKER_TAGS[tuning]

    _LOOKUP.active = True
    try:
        tags = boto3.session.Session(region_name=region).client("sagemaker").list_tags(ResourceArn=arn)["Tags"]
        return {t["Key"]: t["Value"] for t in tags}
    except Exception:
        return {}
    finally:
        _LOOKUP.active = False


# --- recording --------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _template() -> dict[str, Any]:
    return transformed()


@lru_cache(maxsize=16)
def _statements(function: str, env_key: tuple[tuple[str, str], ...], region: str) -> list[dict[str, Any]]:
    template = _template()
    role = function_roles(template)[function]
    resolve = Resolver(template, dict(env_key), region)
    return [resolve(s) for s in role_statements(template, role)]


@lru_cache(maxsize=1)
def _environment_names() -> tuple[str, ...]:
    return tuple(sorted(function_environment(load_template(TEMPLATE))))


def statements_of(function: str, region: str | None = None) -> list[dict[str, Any]]:
    """The function's role statements, resolved against the environment the functions have now."""
    region = region or os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
    env = tuple((k, os.environ[k]) for k in _environment_names() if k in os.environ)
    return _statements(function, env, region)


class Recorder:
    """Every checked call since the last reset, across threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.calls: list[Call] = []
        self.enabled = False

    def reset(self) -> None:
        with self.lock:
            self.calls = []

    def denied(self) -> list[Call]:
        with self.lock:
            return [c for c in self.calls if c.denied]

    def counts(self) -> Counter:
        with self.lock:
            return Counter(c.function for c in self.calls)

    def requests(self) -> dict[str, list[Request]]:
        out: dict[str, list[Request]] = defaultdict(list)
        with self.lock:
            for call in self.calls:
                out[call.function] += call.requests
        return out


RECORDER = Recorder()


@lru_cache(maxsize=1)
def _packages() -> dict[str, str]:
    return handler_packages(load_template(TEMPLATE))


def calling_function() -> str | None:
    """The function whose code is on this thread's stack (innermost), or None."""
    packages = _packages()
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        package = ".".join(module.split(".")[:2])
        if package in packages:
            return packages[package]
        frame = frame.f_back
    return None


def _before_parameter_build(params: dict[str, Any], model: Any, context: dict[str, Any], **_: Any) -> None:
    if not RECORDER.enabled or getattr(_LOOKUP, "active", False):
        return
    function = calling_function()
    if function is None:
        return
    service, region = model.service_model.service_name, context.get("client_region") or os.environ.get(
        "AWS_DEFAULT_REGION", "us-east-1")
    requests = requests_of(service, model.name, params, region)
    statements = statements_of(function, region)
    call = Call(function, f"{service}:{model.name}", requests, [r for r in requests if not allowed(statements, r)])
    with RECORDER.lock:
        RECORDER.calls.append(call)
    context["fusion_function"] = function
    context["fusion_call"] = call
    if call.denied:
        context["fusion_denied"] = call.denied


def _before_call(model: Any, context: dict[str, Any], **_: Any) -> Any:
    denied = context.get("fusion_denied")
    if not denied:
        return None
    message = f"{context['fusion_function']} is not authorized to perform {denied[0].action} on {denied[0].resource}"
    return AWSResponse("https://iam.local", 403, {}, None), {
        "Error": {"Code": "AccessDenied", "Message": message}, "ResponseMetadata": {"HTTPStatusCode": 403}}


def _after_s3_call(http_response: Any, parsed: dict[str, Any], model: Any, context: dict[str, Any], **_: Any) -> None:
    """A missing key answers AccessDenied to a caller that may not list the bucket, as S3 does."""
    function = context.get("fusion_function")
    code = parsed.get("Error", {}).get("Code")
    if function is None or code not in ("NoSuchKey", "404", "NotFound"):
        return
    bucket = context.get("fusion_bucket")
    region = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
    listing = Request("s3:ListBucket", f"arn:{PARTITION}:s3:::{bucket}")
    with RECORDER.lock:
        context["fusion_call"].requests.append(listing)  # what S3 evaluates to answer a missing key
    if bucket and not allowed(statements_of(function, region), listing):
        parsed["Error"] = {"Code": "AccessDenied" if code == "NoSuchKey" else "403", "Message": "Access Denied"}
        parsed.setdefault("ResponseMetadata", {})["HTTPStatusCode"] = 403
        http_response.status_code = 403


def _remember_bucket(params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
    if "Bucket" in params:
        context["fusion_bucket"] = params["Bucket"]


def _register(session: botocore.session.Session) -> None:
    session.register("before-parameter-build", _before_parameter_build)
    session.register("before-parameter-build.s3", _remember_bucket)
    session.register("before-call", _before_call)
    session.register("after-call.s3", _after_s3_call)


_installed = False


def install() -> None:
    """Hook every botocore session made from now on (boto3's sessions wrap one each)."""
    global _installed
    if _installed:
        return
    _installed = True
    original = botocore.session.Session.__init__

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        _register(self)

    botocore.session.Session.__init__ = __init__


def resolved_role(role: str, region: str | None = None) -> list[dict[str, Any]]:
    """A role's statements (any role of the template), resolved against the functions' environment now."""
    region = region or os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
    env = {k: os.environ[k] for k in _environment_names() if k in os.environ}
    return [Resolver(_template(), env, region)(s) for s in role_statements(_template(), role)]


def unused_grants(function: str, requests: list[Request]) -> list[tuple[str, str]]:
    """(action, resource) pairs of the function's role that none of `requests` needed."""
    return unused_grants_of(statements_of(function), requests)


def unused_grants_of(statements: list[dict[str, Any]], requests: list[Request]) -> list[tuple[str, str]]:
    unused = []
    for statement in statements:
        if statement["Effect"] != "Allow":
            continue
        for action in _listed(statement["Action"]):
            for resource in _listed(statement["Resource"]):
                probe = {**statement, "Action": action, "Resource": resource}
                if not any(matches(probe, r) for r in requests):
                    unused.append((action, str(resource)))
    return unused
