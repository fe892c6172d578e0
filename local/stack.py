"""The whole of Fusion on one machine: the embedded default (docs/architecture.md §8).

moto serves DynamoDB, S3, SQS and EventBridge on a loopback port, and every boto3 client finds it
through AWS_ENDPOINT_URL; a local SageMaker (local.sagemaker) takes the training jobs; the HTTP API
is the API function behind local.server. What Lambda's event sources do in AWS is done here by
small pollers: the launch queue feeds the launcher, uploads to the data bucket feed the dataset
check, and the local SageMaker delivers its state changes to the events function. The functions
and the training image run unchanged and cannot tell.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from local.aws import LOCAL_REGION, LambdaContext

REPO = Path(__file__).resolve().parent.parent
REGION = LOCAL_REGION
UPLOADS_QUEUE = "fusion-local-dataset-uploads"
JOB_WATCH_SECONDS = 1.0  # how often `fusion serve` looks for job events to print
# Variables the stack sets for its lifetime and restores on close.
_AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_SAGEMAKER", "AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME",
            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "POWERTOOLS_SERVICE_NAME",
            "POWERTOOLS_LOG_LEVEL", "POWERTOOLS_TRACE_DISABLED", "POWERTOOLS_METRICS_NAMESPACE",
            "POWERTOOLS_METRICS_DISABLED")


def base_model_dir(size: str, home: Path) -> Path:
    """The base model of a named size, made by the training image once per version of its code."""
    target = home / "base-models" / size
    stamp = _image_fingerprint()
    if (target / "config.json").exists() and (target / ".fingerprint").exists() \
            and (target / ".fingerprint").read_text() == stamp:
        return target
    partial = target.with_name(f"{size}.partial-{os.getpid()}")  # two stacks may start at once
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    command = [str(Path(sys.executable).with_name("fusion-train")), "init", "--size", size, "--out", str(partial)]
    if not Path(command[0]).exists():
        command = [sys.executable, "-c", "import sys; from training_image.cli import main; sys.exit(main())", *command[1:]]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"fusion-train init --size {size} failed: {(done.stderr or done.stdout).strip()[-800:]}")
    (partial / ".fingerprint").write_text(stamp)
    stale = target.with_name(f"{size}.stale-{os.getpid()}")
    if target.exists():
        target.rename(stale)
    try:
        partial.rename(target)
    except OSError:  # another process finished first: theirs is as good
        shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(stale, ignore_errors=True)
    return target


def _image_fingerprint() -> str:
    """A hash of the code that makes and reads model directories: a cached base is remade when it changes."""
    digest = hashlib.sha256()
    for path in sorted([*(REPO / "training_image").glob("*.py"), REPO / "shared" / "shapes.py"]):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def tar_model(folder: Path, archive: Path) -> Path:
    """A model directory as SageMaker packs /opt/ml/model: its files at the archive's root."""
    if archive.exists() and archive.stat().st_mtime >= max(p.stat().st_mtime for p in folder.rglob("*")):
        return archive
    files = [p for p in sorted(folder.rglob("*")) if not p.name.startswith(".")]
    partial = archive.with_name(f"{archive.name}.partial-{os.getpid()}")
    with tarfile.open(partial, "w:gz") as tar:
        for path in files:
            tar.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False)
    partial.replace(archive)
    return archive


class Poller:
    """A thread that calls `poll` until stopped; what a Lambda event source mapping does in AWS."""

    def __init__(self, name: str, poll: Callable[[], None]):
        self.stopping = threading.Event()
        self._poll = poll
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                self._poll()
            except Exception:
                if not self.stopping.is_set():
                    traceback.print_exc()
                    self.stopping.wait(1.0)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)


class LocalStack:
    """Start with `with LocalStack(...) as stack:`; everything it started is stopped on exit."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        base_sizes: tuple[str, ...] = ("debug", "tiny"),
        home: Path | str | None = None,
        runs_dir: Path | str | None = None,
        stop_grace_seconds: float = 30.0,
        verbose: bool = False,
        train_command: list[str] | None = None,
    ):
        self.host, self.port = host, port
        self.base_sizes = base_sizes
        self.home = Path(home or os.environ.get("FUSION_HOME") or REPO / ".fusion").resolve()
        self.runs_dir = Path(runs_dir) if runs_dir else self.home / "runs"
        self.stop_grace_seconds = stop_grace_seconds
        self.verbose = verbose
        self.train_command = train_command
        self.env: dict[str, str] = {}
        self.api_url = ""
        self._saved_env: dict[str, str | None] = {}
        self._moto = None
        self._api = None
        self._api_thread: threading.Thread | None = None
        self.sagemaker = None
        self._pollers: list[Poller] = []
        self._session = None

    # --- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> "LocalStack":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> "LocalStack":
        from moto.server import ThreadedMotoServer

        self._saved_env = {k: os.environ.get(k) for k in _AWS_ENV}
        logging.getLogger("werkzeug").setLevel(logging.INFO if self.verbose else logging.ERROR)
        self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._moto.start()
        moto_url = "http://127.0.0.1:%d" % self._moto.get_host_and_port()[1]
        self._reset_moto(moto_url)  # moto's backends live per process: begin with none of an earlier stack's
        os.environ.pop("AWS_PROFILE", None)
        os.environ.pop("AWS_SESSION_TOKEN", None)
        os.environ.update({
            "AWS_ENDPOINT_URL": moto_url,
            "AWS_ACCESS_KEY_ID": "fusion-local",
            "AWS_SECRET_ACCESS_KEY": "fusion-local",
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
        })
        # Before any function module is imported: a Powertools Logger takes its service and level
        # from the environment when it is built.
        os.environ.update(self._powertools_env())
        self._forget_cached_clients()

        import boto3

        from local.resources import create_resources
        from shared.budgets import DEFAULT_BUDGET_ENV
        from shared.store import Catalog, seed_base_models

        # What the operator set in this environment stands; the template's default fills in the rest.
        operator = {k: os.environ[k] for k in (DEFAULT_BUDGET_ENV,) if os.environ.get(k)}
        self._session = boto3.session.Session(region_name=REGION)
        self.env = {**create_resources(self._session), **operator}
        for key in self.env:
            self._saved_env.setdefault(key, os.environ.get(key))
        os.environ.update(self.env)
        os.environ.update(self._powertools_env())
        seed_base_models(Catalog(session=self._session), artifacts_bucket=self.env["ARTIFACTS_BUCKET"])
        for size in self.base_sizes:
            self.publish_base_model(size)

        from local.sagemaker import LocalSageMaker

        self.sagemaker = LocalSageMaker(
            lambda: self._session.client("s3"), self.runs_dir, self._deliver_training_event,
            region=REGION, train_command=self.train_command, stop_grace_seconds=self.stop_grace_seconds,
        )
        from local.endpoints import LocalEndpoints
        from local.resources import pseudo_parameters
        from shared.training_jobs import STACK_ENV

        stack = self.env.get(STACK_ENV) or pseudo_parameters(REGION)["AWS::StackName"]
        self.sagemaker.endpoints = LocalEndpoints(lambda: self._session.client("s3"), self.runs_dir, self._served_model,
                                                  stack)
        os.environ["AWS_ENDPOINT_URL_SAGEMAKER"] = os.environ["AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME"] = \
            self.sagemaker.start()

        self._watch_uploads()
        self._route_bus_rules()
        self._pollers.append(Poller("launch-queue", self._poll_launch_queue))
        for poller in self._pollers:
            poller.start()

        from local.server import make_server

        self._api = make_server(self.host, self.port)
        self._api.daemon_threads = True
        self._api_thread = threading.Thread(target=self._api.serve_forever, name="fusion-api", daemon=True)
        self._api_thread.start()
        self.api_url = f"http://{self.host}:{self._api.server_address[1]}"
        return self

    def _served_model(self, endpoint: str) -> dict[str, Any] | None:
        """The model a local endpoint of this name serves: each ready model of the catalog, as if
        deployed (a base model from its archive, a tenant's model from its job's)."""
        from shared.serving import endpoint_name
        from shared.shapes import SIZES
        from shared.store import BASE_PREFIX, PUBLIC_OWNER, Catalog

        catalog = Catalog(session=self._session)
        for size in SIZES:
            if endpoint_name(BASE_PREFIX + size).lower() == endpoint.lower():  # an ARN holds the name in lower case
                return catalog.get(BASE_PREFIX + size, PUBLIC_OWNER)
        items = self._session.client("dynamodb").scan(TableName=self.env["MODELS_TABLE"],
                                                      ProjectionExpression="model_id, #o", ExpressionAttributeNames={"#o": "owner"})
        for item in items["Items"]:
            if endpoint_name(item["model_id"]["S"]).lower() == endpoint.lower():
                model = catalog.get(item["model_id"]["S"], item["owner"]["S"])
                return model if model and model.get("status", "ready") == "ready" and model.get("artifact_uri") else None
        return None

    def changed_jobs(self, seen: dict[str, str]) -> list[dict[str, Any]]:
        """The jobs (every tenant's) whose status is not the one `seen` holds, oldest change first;
        `seen` is updated. A job that moved twice between two calls is seen once, as it is now."""
        table = self._session.resource("dynamodb").Table(self.env["JOBS_TABLE"])
        page, items = table.scan(), []
        items += page["Items"]
        while "LastEvaluatedKey" in page:
            page = table.scan(ExclusiveStartKey=page["LastEvaluatedKey"])
            items += page["Items"]
        from shared.store import Jobs

        jobs = Jobs(session=self._session)
        changed = [jobs.get(item["job_id"]) for item in items if seen.get(item["job_id"]) != item.get("status")]
        for job in changed:
            seen[job["job_id"]] = job["status"]
        return sorted(changed, key=lambda job: job.get("updated_at", ""))

    @property
    def console_url(self) -> str:
        """The Fusion Training Console, served by the same API (functions.api.console)."""
        from functions.api.console import CONSOLE_PATH

        return self.api_url + CONSOLE_PATH

    def close(self) -> None:
        """Stop the API, the pollers, every training subprocess and moto; restore the environment."""
        if self._api is not None:
            self._api.shutdown()
            self._api.server_close()
            self._api_thread.join(timeout=5)
            self._api = None
        if self.sagemaker is not None:
            self.sagemaker.close(grace_seconds=min(self.stop_grace_seconds, 10))
            self.sagemaker = None
        for poller in self._pollers:
            poller.stop()
        self._pollers = []
        if self._moto is not None:
            self._reset_moto("http://127.0.0.1:%d" % self._moto.get_host_and_port()[1])
            self._moto.stop()
            if self._moto._server is not None:  # stop() leaves the listening socket open
                self._moto._server.server_close()
            self._moto = None
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env = {}
        self._forget_cached_clients()

    @staticmethod
    def _reset_moto(moto_url: str) -> None:
        """Forget every resource moto holds. Its backends are global to the process, so a second
        stack in the same process (a test session, a notebook) would otherwise find the first one's
        tables and buckets."""
        import requests

        requests.post(f"{moto_url}/moto-api/reset", timeout=30).raise_for_status()

    def _powertools_env(self) -> dict[str, str]:
        """The template's Powertools settings, with this stack's: no X-Ray daemon here, and the
        terminal this runs in gets the functions' logs and metric records only when asked for
        (--verbose)."""
        from local.resources import function_environment, load_template

        template = {k: str(v) for k, v in function_environment(load_template()).items() if k.startswith("POWERTOOLS_")}
        return {**template,
                "POWERTOOLS_TRACE_DISABLED": "true",
                "POWERTOOLS_METRICS_DISABLED": "false" if self.verbose else "true",
                "POWERTOOLS_LOG_LEVEL": "INFO" if self.verbose else "WARNING"}

    def _forget_cached_clients(self) -> None:
        """The functions cache their boto3 clients per process; the endpoint has just changed."""
        from functions.api import context as api_context, datasets as api_datasets

        api_context.reset()
        api_datasets._s3.cache_clear()
        idempotency = sys.modules.get("functions.api.idempotency")  # imported on the first keyed request
        if idempotency is not None:
            idempotency._persistence.cache_clear()
        admin = sys.modules.get("functions.admin.app")  # imported on the first /admin request
        if admin is not None:
            admin._tenants.cache_clear()
        for module in ("functions.launcher.app", "functions.events.app", "functions.datasets.app"):
            cached = getattr(__import__(module, fromlist=["_clients"]), "_clients", None)
            if cached is not None and hasattr(cached, "cache_clear"):
                cached.cache_clear()

    # --- base models -----------------------------------------------------------------------

    def publish_base_model(self, size: str) -> str:
        folder = base_model_dir(size, self.home)
        archive = tar_model(folder, self.home / "base-models" / f"{size}.tar.gz")
        key = f"base-models/{size}/model.tar.gz"
        self._session.client("s3").upload_file(str(archive), self.env["ARTIFACTS_BUCKET"], key)
        return f"s3://{self.env['ARTIFACTS_BUCKET']}/{key}"

    # --- event sources ---------------------------------------------------------------------

    def _poll_launch_queue(self) -> None:
        """The launch queue's event source mapping: batches in, only successful messages deleted."""
        from functions.launcher.app import lambda_handler

        sqs = self._session.client("sqs")
        url = self.env["LAUNCH_QUEUE_URL"]
        messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1,
                                       AttributeNames=["All"]).get("Messages", [])
        if not messages:
            return
        arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        event = {"Records": [_sqs_record(m, arn) for m in messages]}
        result = lambda_handler(event, LambdaContext("fusion-launcher")) or {}
        failed = {f["itemIdentifier"] for f in result.get("batchItemFailures", [])}
        done = [m for m in messages if m["MessageId"] not in failed]
        if done:
            sqs.delete_message_batch(QueueUrl=url, Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(done)])
        if failed:  # SQS hands them back after the visibility timeout; a second is enough here
            sqs.change_message_visibility_batch(QueueUrl=url, Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": 1}
                for i, m in enumerate(messages) if m["MessageId"] in failed])

    def _watch_uploads(self) -> None:
        """The data bucket's ObjectCreated notification, through a queue moto can deliver to."""
        sqs = self._session.client("sqs")
        url = sqs.create_queue(QueueName=UPLOADS_QUEUE)["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        self._session.client("s3").put_bucket_notification_configuration(
            Bucket=self.env["DATA_BUCKET"],
            NotificationConfiguration={"QueueConfigurations": [{"QueueArn": arn, "Events": ["s3:ObjectCreated:*"]}]},
        )

        def poll() -> None:
            from functions.datasets.app import lambda_handler

            for message in sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", []):
                event = json.loads(message["Body"])
                if "Records" in event:  # not the s3:TestEvent sent when the notification is set up
                    lambda_handler(event, LambdaContext("fusion-datasets"))
                sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])

        self._pollers.append(Poller("dataset-uploads", poll))

    def _route_bus_rules(self) -> None:
        """The template's EventBridge rules on the Fusion bus, each delivering to its function.

        moto matches the rule's pattern and puts each event on a local queue; a poller hands it to
        the handler the template names, as EventBridge invokes the function in AWS.
        """
        from local.resources import load_template

        events, sqs = self._session.client("events"), self._session.client("sqs")
        bus_refs = {"EventBus": os.environ.get("EVENT_BUS_NAME", "")}
        for logical, resource in load_template()["Resources"].items():
            props = resource.get("Properties", {})
            for name, source in (props.get("Events") or {}).items():
                rule = source.get("Properties", {})
                bus = getattr(rule.get("EventBusName"), "value", None)
                if source.get("Type") != "EventBridgeRule" or bus not in bus_refs:
                    continue  # SageMaker's rule is on the default bus: the local SageMaker delivers it itself
                queue = sqs.create_queue(QueueName=f"fusion-local-{logical}-{name}")["QueueUrl"]
                arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
                events.put_rule(Name=f"{logical}-{name}", EventBusName=bus_refs[bus], EventPattern=json.dumps(rule["Pattern"]))
                events.put_targets(Rule=f"{logical}-{name}", EventBusName=bus_refs[bus], Targets=[{"Id": "local", "Arn": arn}])
                self._pollers.append(Poller(f"rule-{name}", self._queue_to_handler(queue, props["Handler"], logical)))

    def _queue_to_handler(self, queue: str, handler: str, function: str) -> Callable[[], None]:
        module, _, attribute = handler.rpartition(".")
        sqs = self._session.client("sqs")

        def poll() -> None:
            call = getattr(__import__(module, fromlist=[attribute]), attribute)
            for message in sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", []):
                call(json.loads(message["Body"]), LambdaContext(function))
                sqs.delete_message(QueueUrl=queue, ReceiptHandle=message["ReceiptHandle"])

        return poll

    def _deliver_training_event(self, event: dict[str, Any]) -> None:
        """The EventBridge rule on SageMaker's state changes, targeting the events function."""
        from functions.events.app import lambda_handler

        lambda_handler(event, LambdaContext("fusion-events"))


def _sqs_record(message: dict[str, Any], arn: str) -> dict[str, Any]:
    return {
        "messageId": message["MessageId"],
        "receiptHandle": message["ReceiptHandle"],
        "body": message["Body"],
        "attributes": message.get("Attributes", {}),
        "messageAttributes": message.get("MessageAttributes", {}),
        "md5OfBody": message.get("MD5OfBody", ""),
        "eventSource": "aws:sqs",
        "eventSourceARN": arn,
        "awsRegion": REGION,
    }


def interrupt_on_signals() -> None:
    """Ctrl-C, and a SIGTERM too, unwind through the stack's `with` block so it stops everything.

    (Started in the background, Python would ignore SIGINT; killed by SIGTERM, it would skip the
    cleanup and orphan the trainers, which run in sessions of their own.)
    """
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)


def serve(host: str = "127.0.0.1", port: int = 8080, *, base_sizes: tuple[str, ...] = ("debug", "tiny"),
          on_ready: Callable[[LocalStack], None] | None = None, verbose: bool = False,
          on_job: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Run the local stack in the foreground until Ctrl-C; `on_job` hears each job's status changes."""
    interrupt_on_signals()
    with LocalStack(host=host, port=port, base_sizes=base_sizes, verbose=verbose) as stack:
        if on_ready:
            on_ready(stack)
        seen: dict[str, str] = {}
        try:
            while True:
                for job in stack.changed_jobs(seen) if on_job else ():
                    on_job(job)
                time.sleep(JOB_WATCH_SECONDS)
        except KeyboardInterrupt:
            pass
