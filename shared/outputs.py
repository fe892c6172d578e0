"""Reading what the container writes to S3: progress.json and the metrics log while it runs (synced
from its checkpoint folder), metrics.json among its model's files once it has ended.

A job's outputs: SageMaker uploads /opt/ml/model uncompressed (OUTPUT_COMPRESSION, the training
job's OutputDataConfig.CompressionType), file by file under <S3OutputPath>/<training job>/output/model/
(`model_uri`), the prefix DescribeTrainingJob and the state-change event report as
ModelArtifacts.S3ModelArtifacts. That prefix is the model's artifact in the catalog, a later job's
`model` channel (S3Prefix) and a deployment's ModelDataSource (S3Prefix, CompressionType None);
metrics.json is read from it (`metrics_key`). A model archived before (model.tar.gz, its metrics in
the output.tar.gz beside it) and the published base models (base-models/<size>/model.tar.gz) stay
archives, and every reader still takes them (`is_archive`).

Where: a job's checkpoint folder is synced to checkpoints/<job id>/ in the artifacts bucket, which a
lifecycle rule (template.yaml) expires CHECKPOINT_RETENTION_DAYS after each object's last write:
a job's last checkpoint goes that long after the job ends. Its metrics log is kept: when the job
ends, it is copied beside the job's outputs (jobs/<job id>/metrics.jsonl), which never expire.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from shared.contracts import LOG_RECORD, METRICS, METRICS_FILE, Metrics, Progress, problems
from shared.store import missing_object

METRICS_MAX_POINTS = 1000  # training-loss points a job's metrics answer holds at most


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


# CreateTrainingJob's OutputDataConfig.CompressionType for every job and tuning trial: SageMaker then
# copies /opt/ml/model (and /opt/ml/output/data) to S3 as the files they are, where GZIP (its
# default) packs each into one archive on one thread, hours for a 70B model.
OUTPUT_COMPRESSION = "NONE"
ARCHIVE_SUFFIX = ".tar.gz"


def job_output_uri(output_path: str, training_job: str) -> str:
    """Where SageMaker writes a training job's outputs under its OutputDataConfig.S3OutputPath."""
    return f"{output_path.rstrip('/')}/{training_job}/output/"


def model_uri(output_path: str, training_job: str, compression: str = OUTPUT_COMPRESSION) -> str:
    """The job's model artifact (ModelArtifacts.S3ModelArtifacts): the prefix model/ holding the
    files of /opt/ml/model uncompressed, or model.tar.gz where the job packs it (GZIP)."""
    return job_output_uri(output_path, training_job) + ("model/" if compression == "NONE" else "model.tar.gz")


def is_archive(uri: str) -> bool:
    """A model archive (model.tar.gz) rather than a prefix of the model's files."""
    return uri.endswith(ARCHIVE_SUFFIX)


def model_prefix(reported: str) -> str:
    """A reported model artifact as the catalog keeps it: an archive as it is, a prefix ending in
    "/" (S3 prefixes of folders do; the SageMaker Python SDK adds it where the answer lacks it)."""
    return reported if is_archive(reported) or reported.endswith("/") else reported + "/"


def metrics_key(artifact_uri: str) -> tuple[str, str, bool]:
    """(bucket, key, packed) of the job's metrics.json: the file in its model prefix, or for an
    archived model the output.tar.gz beside model.tar.gz that holds it (packed)."""
    bucket, key = split_s3(artifact_uri)
    if is_archive(artifact_uri):
        return bucket, key.rsplit("/", 1)[0] + "/output" + ARCHIVE_SUFFIX, True
    return bucket, model_prefix(key) + METRICS_FILE, False


CHECKPOINTS_PREFIX = "checkpoints/"
CHECKPOINT_RETENTION_DAYS = 7


def checkpoint_prefix(job_id: str) -> str:
    """The S3 prefix the job's checkpoint folder (/opt/ml/checkpoints) is synced to."""
    return f"{CHECKPOINTS_PREFIX}{job_id}/"


def progress_key(job_id: str) -> str:
    return checkpoint_prefix(job_id) + "progress.json"


def read_progress(s3: Any, bucket: str, job_id: str) -> Progress | None:
    """progress.json of a job, or None when there is none to read: not written yet, or not the
    trainer's Progress (a torn or foreign write is no progress, not an error)."""
    from botocore.exceptions import ClientError

    try:
        body = s3.get_object(Bucket=bucket, Key=progress_key(job_id))["Body"].read()
    except ClientError as exc:
        if missing_object(exc):
            return None
        raise
    try:
        return Progress.model_validate_json(body)
    except (ValidationError, RecursionError):
        return None


def metrics_log_key(job_id: str) -> str:
    """The trainer's metrics log (training_image.train.METRICS_LOG), synced beside progress.json."""
    return checkpoint_prefix(job_id) + "metrics.jsonl"


def kept_metrics_log_key(job_id: str) -> str:
    """The metrics log of an ended job, beside its outputs (keep_metrics_log copies it there)."""
    return f"jobs/{job_id}/metrics.jsonl"


def keep_metrics_log(s3: Any, bucket: str, job_id: str) -> bool:
    """Copy an ended job's metrics log out of its checkpoint folder, which expires; False when it
    wrote none. Copying again copies the same log."""
    try:
        s3.copy_object(Bucket=bucket, Key=kept_metrics_log_key(job_id),
                       CopySource={"Bucket": bucket, "Key": metrics_log_key(job_id)})
    except Exception as exc:
        if not missing_object(exc):
            raise
        return False
    return True


def read_metrics_log(s3: Any, bucket: str, job_id: str, *, ended: bool = False,
                     max_points: int = METRICS_MAX_POINTS) -> dict[str, Any]:
    """A job's curve: training loss per logged step (at most max_points, evenly thinned, the last
    step always kept) and every held-out evaluation. Empty lists before the trainer logs anything.
    An ended job's is read from where it is kept, else (not copied yet) from its checkpoint folder.

    A resumed trainer logs the steps after its checkpoint again: the last line of a (kind, step) wins.
    """
    body = b""
    for key in (kept_metrics_log_key(job_id), metrics_log_key(job_id)) if ended else (metrics_log_key(job_id),):
        try:
            body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:
            if not missing_object(exc):
                raise
            continue
        break
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    for line in body.decode("utf-8", errors="replace").splitlines():
        try:
            record = LOG_RECORD.validate_json(line)
        except (ValidationError, RecursionError):  # a line cut by a sync in mid-write
            continue
        latest[(record.kind, record.step)] = record.model_dump(mode="json")
    ordered = [latest[key] for key in sorted(latest, key=lambda k: k[1])]
    steps = [r for r in ordered if r["kind"] == "step"]
    evals = [r for r in ordered if r["kind"] == "eval"]
    stride = -(-len(steps) // max_points) if steps else 1
    thinned = steps[::stride]
    if steps and thinned[-1] is not steps[-1]:
        thinned.append(steps[-1])
    return {"job_id": job_id, "steps": thinned, "evals": evals, "logged_steps": len(steps)}


def read_metrics(s3: Any, model_artifacts_uri: str) -> Metrics:
    """metrics.json of a finished job (`metrics_key`); a ValueError naming what is wrong when it
    does not hold to the container's Metrics."""
    import io
    import tarfile

    bucket, key, packed = metrics_key(model_artifacts_uri)
    blob = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    if not packed:
        document = blob
    else:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as archive:
            found = [m for m in archive.getmembers() if m.isfile() and m.name.rsplit("/", 1)[-1] == METRICS_FILE]
            if not found:
                raise FileNotFoundError(f"no {METRICS_FILE} in s3://{bucket}/{key}")
            document = archive.extractfile(found[0]).read()
    try:
        return METRICS.validate_json(document)
    except ValidationError as exc:
        raise ValueError(f"metrics.json does not hold to the container's metrics: {problems(exc)}") from None
