"""A deployed stack is usable: what moto and the local stack never show (a catalog nobody seeded,
the deploy steps of docs/deploy.md, browsers' CORS, names a second stack repeats, retention,
throttling, alarms, least privilege, SnapStart), read from the template as the SAM transform
makes it, which is what CloudFormation and API Gateway receive."""

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


def _deploy_page() -> str:
    return (ROOT / "docs" / "deploy.md").read_text()


def _deploy_steps() -> str:
    page = _deploy_page()
    return page[page.index("## Day one"):].split("\n## ", 1)[0]


def _commands(text: str) -> list[str]:
    """The shell lines of the page's code blocks, continuation lines joined."""
    blocks = re.findall(r"```\n(.*?)```", text, re.S)
    return [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()
            if line.strip() and not line.strip().startswith("#")]


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
    assert "Service Quotas" in steps and "spot training job usage" in steps


def test_the_deploy_steps_run_literally():
    """Each command as the pinned tools and AWS take it, in the order a first deploy needs."""
    import tomllib

    commands = _commands(_deploy_steps())
    text = "\n".join(commands)
    assert "huggingface-cli" not in text and any(c.startswith("hf download ") for c in commands)
    assert [c for c in commands if c.startswith("docker build")] and \
        all("--platform linux/amd64" in c for c in commands if c.startswith("docker build"))
    aws_calls = [c for c in commands if re.match(r"(\w+=\S+ )?aws ", c)]
    assert aws_calls and all("--region" in c for c in aws_calls if not c.startswith("aws s3 ")), aws_calls
    assert "--no-build-in-source" not in text and "build_in_source = true" in (ROOT / "samconfig.toml").read_text()
    # where the commands come from: this project's console scripts, the pinned SAM CLI
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    page = _deploy_page()
    assert {"fusion", "fusion-train", "fusion-publish"} <= set(scripts)
    assert all(f"`{name}`" in page for name in ("fusion-train", "fusion-publish", "hf"))
    assert "make venv .venv-sam/.installed" in text and ".venv-sam/bin" in text
    # the console's sign-in address is deployed right after the stack, and saved for plain redeploys
    first = next(i for i, c in enumerate(commands) if c.startswith("sam deploy --guided"))
    second = next(i for i, c in enumerate(commands) if c.startswith("sam deploy --parameter-overrides"))
    assert first < second and "ConsoleUrl=$(out ConsoleUrl)" in commands[second] and "--save-params" in commands[second]
    user = next(i for i, c in enumerate(commands) if "admin-create-user" in c)
    group = next(i for i, c in enumerate(commands) if "admin-add-user-to-group" in c)
    assert second < user < group and "--group-name fusion-admins" in commands[group]
    # a CLI user's token: the CLI's own app client, with the one flow it allows
    template = load_template()
    cli_client = template["Resources"]["CliUserPoolClient"]["Properties"]
    assert "ALLOW_USER_PASSWORD_AUTH" in cli_client["ExplicitAuthFlows"] and not cli_client["GenerateSecret"]
    token = next(c for c in _commands(page) if "initiate-auth" in c)
    assert "$(out CliClientId)" in token and "USER_PASSWORD_AUTH" in token and "IdToken" in token
    assert {"CliClientId", "UserPoolId"} <= set(template["Outputs"])
    from shared.admin import ADMIN_GROUP

    assert template["Resources"]["AdminsGroup"]["Properties"]["GroupName"] == ADMIN_GROUP


def test_an_id_token_of_either_client_passes_the_authorizer():
    authorizer = transformed()["Resources"]["HttpApi"]["Properties"]["Body"]["components"]["securitySchemes"]["FusionJwt"]
    audience = authorizer["x-amazon-apigateway-authorizer"]["jwtConfiguration"]["audience"]["Fn::If"][1]
    assert sorted(a["Ref"] for a in audience) == ["CliUserPoolClient", "ConsoleUserPoolClient"]


def test_samconfig_holds_no_deploy_parameters_for_a_guided_deploy_to_save_over():
    import tomllib

    config = tomllib.loads((ROOT / "samconfig.toml").read_text())
    assert "deploy" not in config.get("default", {})  # --guided writes them; the second deploy saves ConsoleUrl


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


def _routes(resources: dict) -> list[dict]:
    return [e["Properties"] for r in resources.values() if r["Type"] == "AWS::Serverless::Function"
            for e in r["Properties"].get("Events", {}).values() if e["Type"] == "HttpApi"]


def test_no_route_takes_a_browsers_preflight_to_the_authorizer():
    routes = _routes(load_template()["Resources"])
    assert routes and all(route["Method"].upper() not in ("ANY", "OPTIONS") for route in routes)


def test_cors_reaches_api_gateway_as_one_complete_object():
    """What API Gateway imports: x-amazon-apigateway-cors an object with every field, its origins
    the CorsAllowedOrigins list; none at all when that is empty (the console is the API's origin)."""
    template = transformed()
    body = template["Resources"]["HttpApi"]["Properties"]["Body"]
    condition, cors, otherwise = body["x-amazon-apigateway-cors"]["Fn::If"]
    assert condition == "HasCorsOrigins" and otherwise == {"Ref": "AWS::NoValue"}
    assert template["Conditions"]["HasCorsOrigins"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "CorsAllowedOrigins"}, ""]}]}
    assert isinstance(cors, dict) and set(cors) == {"allowOrigins", "allowMethods", "allowHeaders", "maxAge"}
    assert cors["allowOrigins"] == {"Fn::Split": [",", {"Ref": "CorsAllowedOrigins"}]}
    methods = {route["Method"].upper() for route in _routes(load_template()["Resources"])}
    assert methods | {"OPTIONS"} == set(cors["allowMethods"])
    assert {"authorization", "content-type", "idempotency-key"} <= set(cors["allowHeaders"]) and cors["maxAge"] > 0
    parameter = load_template()["Parameters"]["CorsAllowedOrigins"]
    assert parameter["Default"] == "" and re.fullmatch(parameter["AllowedPattern"], "https://a.example,http://b:8080")
    assert not re.fullmatch(parameter["AllowedPattern"], "https://a.example, https://b.example")


def test_the_console_uploads_to_the_data_bucket_from_its_own_origin_without_a_parameter():
    template = transformed()
    [rule] = template["Resources"]["DataBucket"]["Properties"]["CorsConfiguration"]["CorsRules"]
    assert rule["AllowedMethods"] == ["PUT"] and "content-type" in rule["AllowedHeaders"]
    condition, with_others, alone = rule["AllowedOrigins"]["Fn::If"]
    origin = template["Outputs"]["ApiUrl"]["Value"]["Fn::Sub"]  # the console's origin: the API's host
    assert template["Outputs"]["ConsoleUrl"]["Value"]["Fn::Sub"].startswith(origin + "/")
    assert condition == "HasCorsOrigins" and alone == [{"Fn::Sub": origin}]
    assert with_others == {"Fn::Split": [",", {"Fn::Sub": origin + ",${CorsAllowedOrigins}"}]}


def test_a_second_stack_in_the_account_and_region_repeats_no_name():
    """Every name the template gives a resource holds the stack's name or id, but for names that
    live inside another resource of the stack (an alias of its function, a group of its pool)."""
    template = transformed()
    scoped = {"AWS::Lambda::Alias", "AWS::Cognito::UserPoolGroup"}
    named = {}
    for logical, resource in template["Resources"].items():
        props = resource.get("Properties", {})
        for key in ("Name", "BucketName", "Domain", "QueueName", "TableName", "RoleName", "LogGroupName",
                    "RepositoryName", "UserPoolName", "AlarmName", "TopicName"):
            if key in props and resource["Type"] not in scoped:
                named[(logical, key)] = json.dumps(props[key])
    assert {("ReconcilerFunctionSchedule", "Name"), ("ConsoleUserPoolDomain", "Domain"), ("DataBucket", "BucketName"),
            ("EventBus", "Name")} <= set(named)
    assert {k: v for k, v in named.items() if "AWS::StackName" not in v and "AWS::StackId" not in v} == {}


def test_the_user_pool_that_keys_every_tenant_outlives_a_replacement_and_sam_delete():
    resources = transformed()["Resources"]
    pool = resources["ConsoleUserPool"]
    assert pool["DeletionPolicy"] == pool["UpdateReplacePolicy"] == "Retain"
    assert pool["Properties"]["DeletionProtection"] == "ACTIVE"
    assert resources["TrainingImageRepository"]["Properties"]["EmptyOnDelete"] is True  # sam delete takes the images


def test_training_jobs_have_no_network_and_only_this_stacks_jobs_reach_its_rules():
    from shared.pricing import estimate_train
    from shared.settings import TrainSettings
    from shared.training_jobs import STACK_ENV, STACK_TAG, LaunchConfig, training_job_request
    from shared.tunings import tuning_job_request
    from tests.conftest import GROWN

    template = transformed()
    rules = {r["Properties"]["EventPattern"]["detail-type"][0]: r["Properties"] for r in template["Resources"].values()
             if r["Type"] == "AWS::Events::Rule" and r["Properties"]["EventPattern"].get("source") == ["aws.sagemaker"]}
    assert set(rules) == {"SageMaker Training Job State Change", "SageMaker HyperParameter Tuning Job State Change"}
    for rule in rules.values():
        assert rule["EventPattern"]["detail"]["Tags"] == {STACK_TAG: [{"Ref": "AWS::StackName"}]}
    variables = load_template()["Globals"]["Function"]["Environment"]["Variables"]
    assert variables[STACK_ENV].value == "AWS::StackName"
    job = {"job_id": "j1", "type": "train", "owner": "o=2Fx", "settings": TrainSettings().model_dump(mode="json"),
           "estimate": estimate_train(TrainSettings(), GROWN).model_dump(mode="json"), "dataset_uri": "s3://d/o/x",
           "input_model_uri": "s3://a/m"}
    config = LaunchConfig(artifacts_bucket="a", training_image_uri="i", role_arn="r", stack="fusion-b")
    request = training_job_request(job, config)
    assert request["EnableNetworkIsolation"] is True
    assert {"Key": STACK_TAG, "Value": "fusion-b"} in request["Tags"]
    assert {"Key": "fusion:owner", "Value": "o=2Fx"} in request["Tags"]  # the owner value as stored, once
    tuning = {**job, "job_id": "tune-1", "tuning": {"ranges": {}, "proxy_fraction": 0.1, "strategy": "Bayesian",
                                                  "early_stopping": "Auto", "objective": "heldout_perplexity",
                                                  "max_trials": 2, "max_parallel_trials": 1}}
    trials = tuning_job_request(tuning, config)
    assert trials["TrainingJobDefinition"]["EnableNetworkIsolation"] is True  # every trial, as every job
    assert trials["Tags"] == [{**t, "Value": "tune-1"} if t["Key"] == "fusion:job-id" else t for t in request["Tags"]]


def test_every_dead_letter_queue_has_an_alarm_the_deploy_page_explains():
    resources = transformed()["Resources"]
    text = json.dumps(resources)
    queues = {name for name, r in resources.items() if r["Type"] == "AWS::SQS::Queue"
              and json.dumps({"deadLetterTargetArn": {"Fn::GetAtt": [name, "Arn"]}})[1:-1] in text
              or name in {d["Destination"]["Fn::GetAtt"][0] for d in (
                  r2["Properties"].get("DestinationConfig", {}).get("OnFailure", {}) for r2 in resources.values()
                  if r2["Type"] == "AWS::Lambda::EventInvokeConfig") if d}}
    assert queues == {"LaunchDeadLetterQueue", "EventsDeadLetterQueue"}
    watched = {}
    for name, alarm in ((n, r["Properties"]) for n, r in resources.items() if r["Type"] == "AWS::CloudWatch::Alarm"):
        [dimension] = alarm["Dimensions"]
        assert alarm["MetricName"] == "ApproximateNumberOfMessagesVisible" and alarm["Namespace"] == "AWS/SQS"
        assert alarm["Threshold"] == 0 and alarm["ComparisonOperator"] == "GreaterThanThreshold"
        assert alarm["AlarmActions"] == {"Fn::If": ["HasAlarmTopic", [{"Ref": "AlarmTopicArn"}], {"Ref": "AWS::NoValue"}]}
        assert dimension["Name"] == "QueueName"
        watched[dimension["Value"]["Fn::GetAtt"][0]] = name
    assert set(watched) == queues
    page = _deploy_page()
    assert all(f"`{alarm}` (queue `{queue}`)" in page for queue, alarm in watched.items())


def _statements(role: dict) -> list[dict]:
    out = []
    for policy in role.get("Policies", []):
        body = policy["PolicyDocument"]["Statement"]
        out += body if isinstance(body, list) else [body]
    return out


def _listed(value) -> list:
    return value if isinstance(value, list) else [value]


def test_each_role_is_held_to_what_it_does():
    resources = transformed()["Resources"]
    roles = {name: r["Properties"] for name, r in resources.items() if r["Type"] == "AWS::IAM::Role"}
    allowed_managed = {"arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole",
                       "arn:aws:iam::aws:policy/AWSXrayWriteOnlyAccess"}
    for name, role in roles.items():  # none of SAM's SQS policy, which reaches every queue
        assert set(role.get("ManagedPolicyArns", [])) <= allowed_managed, name
    statements = {name: _statements(role) for name, role in roles.items()}
    [poll] = [s for s in statements["LauncherFunctionRole"] if s.get("Sid") == "PollLaunchQueue"]
    assert poll["Resource"] == {"Fn::GetAtt": ["LaunchQueue", "Arn"]}
    [mapping] = [r["Properties"] for r in resources.values() if r["Type"] == "AWS::Lambda::EventSourceMapping"]
    assert mapping["EventSourceArn"] == poll["Resource"] and mapping["FunctionName"] == {"Ref": "LauncherFunctionAliaslive"}
    for name, granted in statements.items():  # listing only under the prefixes listed
        for statement in granted:
            if "s3:ListBucket" in _listed(statement["Action"]):
                assert statement["Condition"]["StringLike"]["s3:prefix"], (name, statement)
    for name in ("EventsFunctionRole", "ReconcilerFunctionRole"):  # the objects they read, not all of jobs/
        reads = [r for s in statements[name] if "s3:GetObject" in _listed(s["Action"]) for r in _listed(s["Resource"])]
        assert reads and not [r for r in reads if json.dumps(r).endswith('/jobs/*"}')], name
    for name, resource in resources.items():  # every invocation grant names its one source
        if resource["Type"] == "AWS::Lambda::Permission":
            assert "SourceArn" in resource["Properties"], name
    [upload] = [r["Properties"] for r in resources.values() if r["Type"] == "AWS::Lambda::Permission"
                and r["Properties"]["Principal"] == "s3.amazonaws.com"]
    text, variables = resources["DataBucket"]["Properties"]["BucketName"]["Fn::Sub"]
    assert upload["SourceArn"] == {"Fn::Sub": ["arn:${AWS::Partition}:s3:::" + text, variables]}
    configurations = resources["DataBucket"]["Properties"]["NotificationConfiguration"]["LambdaConfigurations"]
    assert {c["Function"]["Fn::GetAtt"][0] for c in configurations} == {"DatasetsFunction"}
    assert resources["DataBucket"]["DependsOn"] == "DatasetsFunctionUploadPermission"


def test_the_functions_a_request_or_a_job_waits_on_resume_from_a_snapshot_through_their_alias():
    resources = transformed()["Resources"]
    snapstart = {name for name, r in resources.items() if r["Type"] == "AWS::Lambda::Function"
                 and r["Properties"].get("SnapStart") == {"ApplyOn": "PublishedVersions"}}
    assert snapstart == {"ApiFunction", "LauncherFunction", "EventsFunction"}
    aliases = {r["Properties"]["FunctionName"]["Ref"]: name for name, r in resources.items()
               if r["Type"] == "AWS::Lambda::Alias"}
    assert set(aliases) == snapstart
    text = json.dumps({n: r for n, r in resources.items() if r["Type"] not in ("AWS::Lambda::Version",)})
    for function in snapstart:  # nothing invokes the unpublished function, which has no snapshot
        assert f"${{{function}.Arn}}" not in text and json.dumps({"Fn::GetAtt": [function, "Arn"]}) not in text, function
    for rule in (r["Properties"] for r in resources.values() if r["Type"] == "AWS::Events::Rule"):
        assert [t["Arn"] for t in rule["Targets"]] == [{"Ref": aliases["EventsFunction"]}]


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
             and any(t["Arn"] == {"Ref": "EventsFunctionAliaslive"} for t in r["Properties"]["Targets"])}
    assert {s["Fn::GetAtt"][0] for s in sources} == rules and len(rules) == 3  # training and tuning job state changes, jobs requested
    invoke = next(r["Properties"] for r in resources.values() if r["Type"] == "AWS::Lambda::EventInvokeConfig"
                  and r["Properties"]["FunctionName"] == {"Ref": "EventsFunction"})
    assert invoke["MaximumRetryAttempts"] == 2
    assert invoke["DestinationConfig"]["OnFailure"]["Destination"] == {"Fn::GetAtt": ["EventsDeadLetterQueue", "Arn"]}
    schedule = next(r["Properties"] for r in resources.values() if r["Type"] == "AWS::Scheduler::Schedule")
    assert schedule["Target"]["Arn"] == {"Fn::GetAtt": ["ReconcilerFunction", "Arn"]}
