"""SageMaker's training-job API on loopback, running each job as a local subprocess.

boto3 reaches it through AWS_ENDPOINT_URL_SAGEMAKER, so the launcher's create_training_job call is
the one it makes in AWS. Each job gets a directory laid out as SageMaker lays out /opt/ml
(hyperparameters.json, resourceconfig.json, input/data/<channel> pulled from S3, checkpoints/),
the training image's `train` entry point runs on it with FUSION_ML_ROOT pointing there,
checkpoints/ is synced to the CheckpointConfig URI while it runs, and on exit model/ and
output/data are uploaded as SageMaker does under OutputDataConfig.CompressionType: with NONE, file
by file under <output>/model/ and <output>/data/ (the model artifact is the prefix model/); with
GZIP (the default), as model.tar.gz and output.tar.gz. Each status change is handed to
`deliver` as the EventBridge event "SageMaker Training Job State Change". Hyperparameter tuning
jobs run their trials as such training jobs (local.tuner).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from local.aws import LOCAL_ACCOUNT, ApiError
from shared.outputs import job_output_uri, model_uri

NAME_PATTERN = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
GIB = 1 << 30
# A job's host memory on a CPU, from the memory plan's bytes for one GPU: activations are fp32
# here (no bf16 autocast), and the interpreter, torch, the tokenizer and the data add a fixed
# part. Measured: grown `small` (145M parameters, 16 x 256 a step) peaked near 10 GB.
CPU_MEMORY_FACTOR, CPU_MEMORY_BASE = 1.6, GIB // 2
SYNC_SECONDS = 1.0
COMPRESSION_TYPES = ("GZIP", "NONE")  # OutputDataConfig.CompressionType
END_STATES = ("Completed", "Failed", "Stopped")


def _split_s3(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ApiError("ValidationException", f"not an S3 URI: {uri!r}")
    bucket, _, key = uri[5:].partition("/")
    return bucket, key


def _epoch(moment: datetime | None) -> float | None:
    return moment.timestamp() if moment else None


class TrainingJob:
    """One training job: its request, its status, and the subprocess that runs it."""

    def __init__(self, request: dict[str, Any], region: str):
        self.request = request
        self.name: str = request["TrainingJobName"]
        self.arn = f"arn:aws:sagemaker:{region}:{LOCAL_ACCOUNT}:training-job/{self.name.lower()}"
        self.status = "InProgress"
        self.secondary = "Starting"
        self.failure_reason: str | None = None
        self.created = datetime.now(timezone.utc)
        self.started: datetime | None = None
        self.ended: datetime | None = None
        self.modified = self.created
        self.model_uri: str | None = None
        self.metrics: dict[str, float] = {}
        self.metric_history: dict[str, list[float]] = {}  # every value in log order (the tuner's early stopping)
        self.process: subprocess.Popen | None = None
        self.stop_requested = threading.Event()
        self.stop_reason = "Stopped"
        self.log_tail: deque[str] = deque(maxlen=40)
        self.thread: threading.Thread | None = None

    def output_prefix(self) -> str:
        return job_output_uri(self.request["OutputDataConfig"]["S3OutputPath"], self.name)

    def compression(self) -> str:
        return self.request["OutputDataConfig"].get("CompressionType", "GZIP")

    def describe(self) -> dict[str, Any]:
        r = self.request
        out = {
            "TrainingJobName": self.name,
            "TrainingJobArn": self.arn,
            "TrainingJobStatus": self.status,
            "SecondaryStatus": self.secondary,
            "HyperParameters": r.get("HyperParameters", {}),
            "AlgorithmSpecification": r["AlgorithmSpecification"],
            "RoleArn": r["RoleArn"],
            "InputDataConfig": r.get("InputDataConfig", []),
            "OutputDataConfig": r["OutputDataConfig"],
            "ResourceConfig": r["ResourceConfig"],
            "StoppingCondition": r["StoppingCondition"],
            "CreationTime": _epoch(self.created),
            "LastModifiedTime": _epoch(self.modified),
            "ModelArtifacts": {"S3ModelArtifacts": self.model_uri or model_uri(
                self.request["OutputDataConfig"]["S3OutputPath"], self.name, self.compression())},
        }
        for key in ("CheckpointConfig", "Environment", "EnableManagedSpotTraining", "EnableNetworkIsolation",
                    "RetryStrategy"):
            if key in r:
                out[key] = r[key]
        if self.started:
            out["TrainingStartTime"] = _epoch(self.started)
        if self.ended:
            out["TrainingEndTime"] = _epoch(self.ended)
            out["TrainingTimeInSeconds"] = out["BillableTimeInSeconds"] = max(
                1, round((self.ended - (self.started or self.created)).total_seconds())
            )
        if self.failure_reason:
            out["FailureReason"] = self.failure_reason
        if self.metrics:
            out["FinalMetricDataList"] = [
                {"MetricName": k, "Value": v, "Timestamp": _epoch(self.modified)} for k, v in self.metrics.items()
            ]
        return out

    def summary(self) -> dict[str, Any]:
        out = {
            "TrainingJobName": self.name,
            "TrainingJobArn": self.arn,
            "CreationTime": _epoch(self.created),
            "LastModifiedTime": _epoch(self.modified),
            "TrainingJobStatus": self.status,
        }
        if self.ended:
            out["TrainingEndTime"] = _epoch(self.ended)
        return out


class LocalSageMaker:
    """The training-job API and its runner. `deliver` receives each state-change event."""

    def __init__(
        self,
        s3_client: Callable[[], Any],
        work_dir: Path,
        deliver: Callable[[dict[str, Any]], None],
        *,
        region: str = "us-east-1",
        train_command: list[str] | None = None,
        stop_grace_seconds: float = 30.0,
        memory_bytes: int | None = None,
    ):
        self._s3_factory = s3_client
        self._s3 = None
        self.work_dir = Path(work_dir)
        self.deliver = deliver
        self.region = region
        self.train_command = train_command or default_train_command()
        self.stop_grace_seconds = stop_grace_seconds
        self.jobs: dict[str, TrainingJob] = {}
        self.tunings: dict[str, Any] = {}  # local.tuner.TuningJob by name
        self.lock = threading.Lock()
        # Jobs start only while the memory they need fits what was free when the stack started
        # (one always may), and share the cores: two trainers each given every core thrash.
        self.memory_bytes = memory_bytes if memory_bytes is not None else available_memory()
        self.cores = max(1, (os.cpu_count() or 2) - 1)  # a core is left to the stack itself
        self._running: dict[str, int] = {}  # job name -> the bytes it was admitted with
        self._room = threading.Condition(self.lock)
        self.server: ThreadingHTTPServer | None = None
        self._server_thread: threading.Thread | None = None
        self.endpoints: Any = None  # local.endpoints.LocalEndpoints: the runtime's InvokeEndpoint, and ListTags

    @property
    def s3(self) -> Any:
        if self._s3 is None:
            self._s3 = self._s3_factory()
        return self._s3

    # --- the API ----------------------------------------------------------------------------

    def create_training_job(self, request: dict[str, Any]) -> dict[str, Any]:
        for required in ("TrainingJobName", "AlgorithmSpecification", "RoleArn", "OutputDataConfig",
                         "ResourceConfig", "StoppingCondition"):
            if required not in request:
                raise ApiError("ValidationException", f"1 validation error detected: Value null at '{required}' "
                               "failed to satisfy constraint: Member must not be null")
        compression = request["OutputDataConfig"].get("CompressionType", "GZIP")
        if compression not in COMPRESSION_TYPES:
            raise ApiError("ValidationException", f"Value '{compression}' at 'outputDataConfig.compressionType' failed "
                           f"to satisfy constraint: Member must satisfy enum value set: [{', '.join(COMPRESSION_TYPES)}]")
        name = request["TrainingJobName"]
        if not NAME_PATTERN.match(name):
            raise ApiError("ValidationException", f"Value '{name}' at 'trainingJobName' failed to satisfy constraint: "
                           f"Member must satisfy regular expression pattern: {NAME_PATTERN.pattern}")
        with self.lock:
            if name in self.jobs:
                raise ApiError("ResourceInUse", f"Training job names must be unique within an AWS account and region, "
                               f"and a training job with this name already exists ({self.jobs[name].arn})")
            job = TrainingJob(request, self.region)
            self.jobs[name] = job
        job.thread = threading.Thread(target=self._run, args=(job,), name=f"sagemaker-{name}", daemon=True)
        job.thread.start()
        return {"TrainingJobArn": job.arn}

    def describe_training_job(self, request: dict[str, Any]) -> dict[str, Any]:
        return self._job(request.get("TrainingJobName", "")).describe()

    def list_training_jobs(self, request: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            jobs = list(self.jobs.values())
        if "StatusEquals" in request:
            jobs = [j for j in jobs if j.status == request["StatusEquals"]]
        if "NameContains" in request:
            jobs = [j for j in jobs if request["NameContains"] in j.name]
        jobs.sort(key=lambda j: j.created if request.get("SortBy", "CreationTime") == "CreationTime" else j.name,
                  reverse=request.get("SortOrder", "Descending") == "Descending")
        start = int(request.get("NextToken") or 0)
        size = int(request.get("MaxResults", 10))
        page = {"TrainingJobSummaries": [j.summary() for j in jobs[start:start + size]]}
        if start + size < len(jobs):
            page["NextToken"] = str(start + size)
        return page

    def stop_training_job(self, request: dict[str, Any]) -> dict[str, Any]:
        job = self._job(request.get("TrainingJobName", ""))
        with self.lock:
            if job.status != "InProgress":
                raise ApiError("ValidationException",
                               f"The request was rejected because the training job is in status {job.status}.")
            job.status = job.secondary = "Stopping"
            job.modified = datetime.now(timezone.utc)
            job.stop_requested.set()
        self._emit(job)
        threading.Thread(target=self._terminate, args=(job,), daemon=True).start()
        return {}

    # The tuner's API (local.tuner): trials are this service's training jobs.

    def create_hyper_parameter_tuning_job(self, request: dict[str, Any]) -> dict[str, Any]:
        from local import tuner

        return tuner.create(self, request)

    def describe_hyper_parameter_tuning_job(self, request: dict[str, Any]) -> dict[str, Any]:
        from local import tuner

        return tuner.describe(self, request)

    def list_training_jobs_for_hyper_parameter_tuning_job(self, request: dict[str, Any]) -> dict[str, Any]:
        from local import tuner

        return tuner.list_trials(self, request)

    def stop_hyper_parameter_tuning_job(self, request: dict[str, Any]) -> dict[str, Any]:
        from local import tuner

        return tuner.stop(self, request)

    def list_tags(self, request: dict[str, Any]) -> dict[str, Any]:
        from local.endpoints import EndpointError

        if self.endpoints is None or ":endpoint/" not in request.get("ResourceArn", ""):
            raise ApiError("ValidationException", f"tags of {request.get('ResourceArn')!r} are not served locally")
        try:
            return {"Tags": self.endpoints.tags(request["ResourceArn"])}
        except EndpointError as error:
            raise ApiError(error.code, error.message, error.status) from None

    def _job(self, name: str) -> TrainingJob:
        with self.lock:
            job = self.jobs.get(name)
        if job is None:
            raise ApiError("ValidationException", "Requested resource not found.")
        return job

    # --- the runner -------------------------------------------------------------------------

    def _run(self, job: TrainingJob) -> None:
        root = self.work_dir / job.name
        try:
            self._emit(job)
            self._lay_out(job, root)
            job.started = datetime.now(timezone.utc)
            job.secondary = "Training"
            try:
                self._train(job, root)
            except _JobFailure as failure:
                job.failure_reason = str(failure)
            job.secondary = "Uploading"
            self._upload_outputs(job, root, with_model=job.failure_reason is None)
        except _JobFailure as failure:
            job.failure_reason = str(failure)
        except Exception as error:  # the runner itself broke: the job fails saying so, as SageMaker's would
            job.failure_reason = job.failure_reason or f"InternalServerError: {error!r}"
        self._finish(job, root)

    def _lay_out(self, job: TrainingJob, root: Path) -> None:
        shutil.rmtree(root, ignore_errors=True)
        for sub in ("input/config", "input/data", "model", "output/data", "checkpoints"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        r = job.request
        config = root / "input/config"
        (config / "hyperparameters.json").write_text(json.dumps(r.get("HyperParameters", {})))
        hosts = [f"algo-{i + 1}" for i in range(int(r["ResourceConfig"].get("InstanceCount", 1)))]
        (config / "resourceconfig.json").write_text(
            json.dumps({"current_host": hosts[0], "hosts": hosts, "network_interface_name": "eth0"})
        )
        channels = {}
        for channel in r.get("InputDataConfig", []):
            name = channel["ChannelName"]
            source = channel["DataSource"]["S3DataSource"]
            channels[name] = {"TrainingInputMode": channel.get("InputMode", "File"),
                              "S3DistributionType": source.get("S3DataDistributionType", "FullyReplicated"),
                              "RecordWrapperType": "None"}
            if not self._download(source["S3Uri"], root / "input/data" / name):
                raise _JobFailure(f"ClientError: No S3 objects found under S3 URL \"{source['S3Uri']}\" given in "
                                  f"input data source. Please ensure that the bucket exists in the selected region "
                                  f"({self.region}), that objects exist under that S3 prefix, and that the role "
                                  f"\"{r['RoleArn']}\" has \"s3:ListBucket\" permissions on bucket.")
        (config / "inputdataconfig.json").write_text(json.dumps(channels))
        if "CheckpointConfig" in r:  # SageMaker restores earlier checkpoints before the job starts
            self._download(r["CheckpointConfig"]["S3Uri"].rstrip("/") + "/", root / "checkpoints")

    def _download(self, uri: str, into: Path) -> int:
        bucket, prefix = _split_s3(uri)
        # Keys keep their path below the prefix's folder, as File mode copies them.
        if not prefix or prefix.endswith("/"):
            base = prefix
        else:
            base = prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else ""
        count = 0
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                if item["Key"].endswith("/"):
                    continue
                target = into / item["Key"][len(base):]
                target.parent.mkdir(parents=True, exist_ok=True)
                self.s3.download_file(bucket, item["Key"], str(target))
                count += 1
        return count

    def _train(self, job: TrainingJob, root: Path) -> None:
        need = job_memory_bytes(root)
        if not self._admit(job, need):
            return
        try:
            self._run_process(job, root, need)
        finally:
            with self._room:
                self._running.pop(job.name, None)
                self._room.notify_all()

    def _admit(self, job: TrainingJob, need: int) -> bool:
        """Wait until the job's memory fits beside the running jobs' (or none runs); False when
        it was stopped while waiting."""
        with self._room:
            while self._running and sum(self._running.values()) + need > self.memory_bytes:
                if job.stop_requested.is_set():
                    return False
                job.log_tail.append(f"waiting for memory: needs about {need / GIB:.1f} GiB, "
                                    f"{len(self._running)} job(s) running")
                self._room.wait(timeout=1.0)
            if job.stop_requested.is_set():
                return False
            self._running[job.name] = need
        return True

    def _run_process(self, job: TrainingJob, root: Path, need: int) -> None:
        env = {**os.environ, "FUSION_ML_ROOT": str(root), "PYTHONUNBUFFERED": "1"}
        # The cores are shared among the jobs running now, whatever OMP_NUM_THREADS the stack
        # inherited: torch's spinning worker threads otherwise fight each other and the stack's
        # own threads, and a tiny model trains 10x slower.
        with self.lock:
            running = len(self._running)
        env["OMP_NUM_THREADS"] = str(max(1, self.cores // running))
        env.update(job.request.get("Environment", {}))
        if job.request.get("EnableNetworkIsolation"):  # as in SageMaker: no way to AWS from inside the job
            env = {k: v for k, v in env.items() if not k.startswith("AWS_")}
        log = open(root / "train.log", "w", encoding="utf-8")
        with self.lock:
            if job.stop_requested.is_set():
                return
            job.process = subprocess.Popen(
                self.train_command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, bufsize=1, start_new_session=True,
            )
        reader = threading.Thread(target=self._read_output, args=(job, log), daemon=True)
        reader.start()
        limit = float(job.request["StoppingCondition"].get("MaxRuntimeInSeconds", 86400))
        synced: dict[str, tuple[float, int]] = {}
        deadline = time.monotonic() + limit
        while job.process.poll() is None:
            try:
                job.process.wait(timeout=SYNC_SECONDS)
            except subprocess.TimeoutExpired:
                pass
            self._sync_checkpoints(job, root, synced)
            if time.monotonic() > deadline and not job.stop_requested.is_set():
                job.stop_reason = "MaxRuntimeExceeded"
                job.stop_requested.set()
                threading.Thread(target=self._terminate, args=(job,), daemon=True).start()
        reader.join(timeout=10)
        log.close()
        self._sync_checkpoints(job, root, synced)
        code = job.process.returncode
        if code != 0 and not job.stop_requested.is_set():
            failure = root / "output/failure"
            text = failure.read_text(errors="replace").strip() if failure.exists() else ""
            if not text and code in (-signal.SIGKILL, 128 + signal.SIGKILL):
                text = (f"OutOfMemory: the train entry point was killed (SIGKILL), on this machine by the kernel's "
                        f"out-of-memory killer: the job needs about {need / GIB:.1f} GiB and "
                        f"{available_memory() / GIB:.1f} GiB are free now; run fewer jobs at once, a smaller "
                        "model or a shorter seq_len")
            if not text:
                text = f"ExecuteUserScriptError: the train entry point exited with code {code}: " + " | ".join(
                    list(job.log_tail)[-5:])
            raise _JobFailure(f"AlgorithmError: {text}"[:1024])

    def _read_output(self, job: TrainingJob, log) -> None:
        definitions = [(d["Name"], re.compile(d["Regex"]))
                       for d in job.request["AlgorithmSpecification"].get("MetricDefinitions", [])]
        for line in job.process.stdout:
            log.write(line)
            log.flush()
            job.log_tail.append(line.rstrip())
            for name, pattern in definitions:
                match = pattern.search(line)
                if match:
                    try:
                        job.metrics[name] = float(match.group(1))
                    except (ValueError, IndexError):
                        continue
                    job.metric_history.setdefault(name, []).append(job.metrics[name])

    def _sync_checkpoints(self, job: TrainingJob, root: Path, synced: dict[str, tuple[float, int]]) -> None:
        config = job.request.get("CheckpointConfig")
        if not config:
            return
        bucket, prefix = _split_s3(config["S3Uri"].rstrip("/") + "/")
        for path in sorted((root / "checkpoints").rglob("*")):
            if not path.is_file() or path.name.startswith("."):
                continue
            try:
                stat = path.stat()
                data = path.read_bytes()
            except FileNotFoundError:  # replaced by an atomic rename as we looked
                continue
            relative = path.relative_to(root / "checkpoints").as_posix()
            if synced.get(relative) == (stat.st_mtime, stat.st_size):
                continue
            self.s3.put_object(Bucket=bucket, Key=prefix + relative, Body=data)
            synced[relative] = (stat.st_mtime, stat.st_size)

    def _upload_outputs(self, job: TrainingJob, root: Path, *, with_model: bool) -> None:
        bucket, prefix = _split_s3(job.output_prefix())
        packed = job.compression() != "NONE"
        if with_model and any((root / "model").iterdir()):
            uri = model_uri(job.request["OutputDataConfig"]["S3OutputPath"], job.name, job.compression())
            if packed:
                self._upload_tar(root / "model", bucket, _split_s3(uri)[1])
            else:
                self._upload_files(root / "model", bucket, _split_s3(uri)[1])
            job.model_uri = uri
        if packed:
            self._upload_tar(root / "output/data", bucket, prefix + "output.tar.gz")
        else:
            self._upload_files(root / "output/data", bucket, prefix + "data/")

    def _upload_files(self, folder: Path, bucket: str, prefix: str) -> None:
        """Every file under `folder` as an object under `prefix`, its relative path kept."""
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                self.s3.upload_file(str(path), bucket, prefix + path.relative_to(folder).as_posix())

    def _upload_tar(self, folder: Path, bucket: str, key: str) -> None:
        archive = folder.parent / (key.rsplit("/", 1)[-1])
        with tarfile.open(archive, "w:gz") as tar:
            for path in sorted(folder.rglob("*")):
                tar.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False)
        self.s3.upload_file(str(archive), bucket, key)

    def _terminate(self, job: TrainingJob) -> None:
        """SIGTERM the trainer's process group, then SIGKILL it after the grace period."""
        deadline = time.monotonic() + 30
        while job.process is None and job.status not in END_STATES and time.monotonic() < deadline:
            time.sleep(0.05)  # still laying out: the runner sees stop_requested before it starts
        process = job.process
        if process is None or process.poll() is not None:
            return
        _signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=self.stop_grace_seconds)
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait()

    def _finish(self, job: TrainingJob, root: Path) -> None:
        with self.lock:
            job.ended = job.modified = datetime.now(timezone.utc)
            if job.stop_requested.is_set():
                job.status, job.secondary = "Stopped", job.stop_reason
                job.failure_reason = None
            elif job.failure_reason:
                job.status = job.secondary = "Failed"
            else:
                job.status = job.secondary = "Completed"
        self._emit(job)

    def _emit(self, job: TrainingJob) -> None:
        event = {
            "version": "0",
            "id": str(uuid.uuid4()),
            "detail-type": "SageMaker Training Job State Change",
            "source": "aws.sagemaker",
            "account": LOCAL_ACCOUNT,
            "time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "region": self.region,
            "resources": [job.arn],
            # The event's detail is the DescribeTrainingJob shape with times in epoch milliseconds.
            "detail": {k: (round(v * 1000) if k.endswith("Time") and isinstance(v, float) else v)
                       for k, v in job.describe().items()},
        }
        try:
            self.deliver(event)
        except Exception as error:  # EventBridge retries and then drops; the job's own status is unaffected
            print(f"[local sagemaker] delivering {job.status} of {job.name} failed: {error!r}", file=sys.stderr)

    # --- the HTTP server --------------------------------------------------------------------

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self.server = ThreadingHTTPServer((host, port), _handler_for(self))
        self.server.daemon_threads = True
        self._server_thread = threading.Thread(target=self.server.serve_forever, name="local-sagemaker", daemon=True)
        self._server_thread.start()
        return f"http://{host}:{self.server.server_address[1]}"

    def close(self, grace_seconds: float = 5.0) -> None:
        """Stop every running job (SIGTERM, then SIGKILL) and the server; wait for the runners."""
        self.stop_grace_seconds = min(self.stop_grace_seconds, grace_seconds)
        with self.lock:
            jobs = list(self.jobs.values())
            tunings = list(self.tunings.values())
        for tuning in tunings:  # starts no further trial
            tuning.stop_requested.set()
        for job in jobs:
            if job.status in ("InProgress", "Stopping"):
                job.stop_requested.set()
                self._terminate(job)
        for job in jobs:
            if job.thread is not None:
                job.thread.join(timeout=grace_seconds + 30)
        for tuning in tunings:
            if tuning.thread is not None:
                tuning.thread.join(timeout=grace_seconds + 30)
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self._server_thread.join(timeout=5)
            self.server = None

    def wait(self, name: str, timeout: float) -> str:
        """Block until a job ends (for tests); returns its status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self._job(name)
            if job.status in END_STATES and (job.thread is None or not job.thread.is_alive()):
                return job.status
            time.sleep(0.1)
        raise TimeoutError(f"{name} still {self._job(name).status} after {timeout} s")


class _JobFailure(Exception):
    pass


def available_memory() -> int:
    """The bytes the kernel could give a new process now (MemAvailable), else all of it."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def job_memory_bytes(root: Path) -> int:
    """About the host memory a job laid out in `root` takes on a CPU: the memory plan's bytes for
    its model (the base grown, for a train job), sequence length and micro-batch, scaled for the
    CPU. The fixed part alone when the model's config cannot be read."""
    from shared.memory import bytes_per_gpu
    from shared.shapes import ModelConfig, batch_size_for, grown_config

    try:
        hyper = json.loads((root / "input/config/hyperparameters.json").read_text())
        config = _model_config(root / "input/data/model")
    except (OSError, ValueError, tarfile.TarError):
        return CPU_MEMORY_BASE
    if config is None:
        return CPU_MEMORY_BASE
    try:
        config = ModelConfig.model_validate_json(config)
    except ValueError:  # not our config's shape: the trainer says what is wrong with it
        return CPU_MEMORY_BASE
    config = config if hyper.get("job_type") != "train" else grown_config(config)
    seq_len = int(hyper.get("seq_len") or 256)
    micro_batch = int(hyper.get("micro_batch") or batch_size_for(config.parameters(), seq_len))
    plan = bytes_per_gpu(config, seq_len=seq_len, micro_batch=micro_batch, strategy="ddp", world_size=1,
                         checkpointing=hyper.get("activation_checkpointing") == "true")
    return int(plan.total * CPU_MEMORY_FACTOR) + CPU_MEMORY_BASE


def _model_config(channel: Path) -> str | None:
    """config.json of the model channel: a model directory, or the model.tar.gz holding one."""
    if (channel / "config.json").is_file():
        text = (channel / "config.json").read_text()
        return None if "model_type" in text else text  # a Hugging Face folder: not our config's shape
    for archive in channel.glob("*.tar.gz"):
        with tarfile.open(archive) as tar:
            for name in ("config.json", "./config.json"):
                try:
                    member = tar.extractfile(name)
                except KeyError:
                    continue
                return member.read().decode() if member else None
    return None


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def default_train_command() -> list[str]:
    """The training image's `train` console script beside this interpreter, or the module itself."""
    script = Path(sys.executable).with_name("train")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from training_image.entry import main; sys.exit(main())"]


OPERATIONS = {
    "CreateTrainingJob": LocalSageMaker.create_training_job,
    "DescribeTrainingJob": LocalSageMaker.describe_training_job,
    "ListTrainingJobs": LocalSageMaker.list_training_jobs,
    "StopTrainingJob": LocalSageMaker.stop_training_job,
    "CreateHyperParameterTuningJob": LocalSageMaker.create_hyper_parameter_tuning_job,
    "DescribeHyperParameterTuningJob": LocalSageMaker.describe_hyper_parameter_tuning_job,
    "ListTrainingJobsForHyperParameterTuningJob": LocalSageMaker.list_training_jobs_for_hyper_parameter_tuning_job,
    "StopHyperParameterTuningJob": LocalSageMaker.stop_hyper_parameter_tuning_job,
    "ListTags": LocalSageMaker.list_tags,
}
INVOCATIONS = re.compile(r"^/endpoints/([^/]+)/invocations$")  # SageMaker runtime's InvokeEndpoint (REST)


def _handler_for(service: LocalSageMaker) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            invocation = INVOCATIONS.match(self.path.split("?")[0])
            if invocation:
                self._invoke(invocation.group(1))
                return
            target = self.headers.get("X-Amz-Target", "")
            operation = target.rpartition(".")[2]
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if operation not in OPERATIONS:
                    raise ApiError("UnknownOperationException", f"{operation or target!r} is not served locally")
                self._send(200, OPERATIONS[operation](service, body))
            except ApiError as error:
                self._send(error.status, {"__type": error.code, "message": error.message})
            except Exception as error:  # a bug here must reach the caller as a 500, not hang it
                self._send(500, {"__type": "InternalFailure", "message": repr(error)})

        def _invoke(self, name: str) -> None:
            from urllib.parse import unquote

            from local.endpoints import EndpointError

            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                if service.endpoints is None:
                    raise EndpointError(400, "ValidationException", f"Endpoint {unquote(name)} not found.")
                self._send(200, service.endpoints.invoke(unquote(name), body), "application/json")
            except EndpointError as error:
                self._send(error.status, {"__type": error.code, "message": error.message},
                           extra={"x-amzn-ErrorType": error.code})
            except Exception as error:  # a bug here must reach the caller as a 500, not hang it
                self._send(500, {"__type": "InternalFailure", "message": repr(error)},
                           extra={"x-amzn-ErrorType": "InternalFailure"})

        def _send(self, status: int, payload: Any, content_type: str = "application/x-amz-json-1.1",
                  extra: dict[str, str] | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            for key, value in (extra or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    return Handler
