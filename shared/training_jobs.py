"""The SageMaker training job of a Fusion job: its name, its CreateTrainingJob request, and the
calls that ask whether it exists or stop it. The client comes in as an argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.contracts import PRECISION_ENV, PRECISIONS, Hyperparameters, Precision
from shared.lifecycle import JOB_ID_PATTERN
from shared.outputs import OUTPUT_COMPRESSION, checkpoint_prefix
from shared.pricing import Estimate
from shared.settings import SETTINGS_BY_TYPE, JobSettings

TRAINING_JOB_PREFIX = "fusion-"
# The training job's tag that names the stack which launched it: that stack's rule matches it, and
# no other stack's (the name prefix is the same in every stack).
STACK_TAG = "fusion:stack"
STACK_ENV = "FUSION_STACK"
METRIC_NAMES = ("step", "turn", "cycle", "train_loss", "heldout_loss", "heldout_perplexity", "tokens_per_second")
# The container's `name=value` lines, as SageMaker reads them from its log (training jobs and tuning trials).
METRIC_DEFINITIONS = [{"Name": n, "Regex": f"{n}=([0-9.eE+-]+)"} for n in METRIC_NAMES]
MAX_RUNTIME_LIMIT = 28 * 24 * 3600  # SageMaker's ceiling on MaxRuntimeInSeconds
VALIDATION_CHANNEL = "validation"  # a train job's validation set, when it names one


def training_job_name(job_id: str) -> str:
    return TRAINING_JOB_PREFIX + job_id


def job_id_of(training_job: str) -> str | None:
    if not training_job.startswith(TRAINING_JOB_PREFIX):
        return None
    job_id = training_job[len(TRAINING_JOB_PREFIX):]
    return job_id if JOB_ID_PATTERN.fullmatch(job_id) else None


def settings_of(job: dict[str, Any]) -> JobSettings:
    return SETTINGS_BY_TYPE[job["type"]].model_validate(job["settings"])


@dataclass(frozen=True)
class LaunchConfig:
    artifacts_bucket: str
    training_image_uri: str
    role_arn: str
    use_spot: bool = False
    volume_size_gb: int = 50
    stack: str = ""  # the stack's name (STACK_TAG); empty outside a stack
    precision: Precision = "auto"  # the stack's TrainingPrecision, passed to the container as PRECISION_ENV

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"{PRECISION_ENV}={self.precision!r}: expected one of {', '.join(PRECISIONS)}")


def training_job_request(job: dict[str, Any], config: LaunchConfig) -> dict[str, Any]:
    """The CreateTrainingJob parameters of a stored job (boto3 shapes)."""
    job_id = job["job_id"]
    estimate = Estimate.model_validate(job["estimate"])
    prefix = f"s3://{config.artifacts_bucket}/jobs/{job_id}"
    max_runtime = min(estimate.max_runtime_seconds, MAX_RUNTIME_LIMIT)
    stopping: dict[str, int] = {"MaxRuntimeInSeconds": max_runtime}
    spot = config.use_spot or estimate.spot  # the stack's switch puts every tier on spot
    if spot:  # waiting for spot capacity gets as long again as the run itself
        stopping["MaxWaitTimeInSeconds"] = min(2 * max_runtime, MAX_RUNTIME_LIMIT)
    return {
        "TrainingJobName": training_job_name(job_id),
        "HyperParameters": Hyperparameters(job_type=job["type"], job_id=job_id, settings=settings_of(job),
                                           layout=estimate.layout()).strings(),
        "AlgorithmSpecification": {
            "TrainingImage": config.training_image_uri,
            "TrainingInputMode": "File",
            "MetricDefinitions": METRIC_DEFINITIONS,
            "EnableSageMakerMetricsTimeSeries": True,
        },
        "RoleArn": config.role_arn,
        "Environment": {PRECISION_ENV: config.precision},
        "InputDataConfig": input_channels(job),
        "OutputDataConfig": output_config(f"{prefix}/output/"),
        # Outside jobs/: a lifecycle rule expires checkpoints (shared.outputs.CHECKPOINT_RETENTION_DAYS).
        "CheckpointConfig": {"S3Uri": f"s3://{config.artifacts_bucket}/{checkpoint_prefix(job_id)}",
                             "LocalPath": "/opt/ml/checkpoints"},
        "ResourceConfig": {
            "InstanceType": estimate.instance_type,
            "InstanceCount": estimate.instance_count,
            "VolumeSizeInGB": config.volume_size_gb,
        },
        "StoppingCondition": stopping,
        "EnableManagedSpotTraining": spot,
        "EnableNetworkIsolation": NETWORK_ISOLATION,
        "Tags": job_tags(job_id, job["owner"], config),
    }


def output_config(output_path: str) -> dict[str, str]:
    """OutputDataConfig of a job or a tuning's trials: the model uploaded uncompressed, file by file
    (shared.outputs.model_uri says where)."""
    return {"S3OutputPath": output_path, "CompressionType": OUTPUT_COMPRESSION}


# The container reads its channels and writes /opt/ml; SageMaker moves the data. It makes no network
# call of its own, so it gets no network (multi-instance jobs still reach each other). Every training
# job gets it: a job's own and a tuning's trials.
NETWORK_ISOLATION = True


def job_tags(job_id: str, owner: str, config: LaunchConfig) -> list[dict[str, str]]:
    """The tags of a job's SageMaker resource (a training job, or a tuning job, whose tags its trials
    inherit). The stack's tag is what this stack's roles may describe and stop (template.yaml's
    aws:ResourceTag conditions), and what its rule matches."""
    return [{"Key": "fusion:job-id", "Value": job_id}, {"Key": "fusion:owner", "Value": owner},
            *([{"Key": STACK_TAG, "Value": config.stack}] if config.stack else [])]


def input_channels(job: dict[str, Any]) -> list[dict[str, Any]]:
    """The job's data, its base (or source) model, or an evaluate job's one channel per model, and,
    when it names one, its validation set, as the container's input channels."""
    if job["type"] == "evaluate":
        models = [_channel(model_channel(i), uri) for i, uri in enumerate(job["input_model_uris"])]
    else:
        models = [_channel("model", job["input_model_uri"])]
    return [_channel("training", job["dataset_uri"]), *models,
            *([_channel(VALIDATION_CHANNEL, job["validation_dataset_uri"])] if job.get("validation_dataset_uri") else [])]


def model_channel(index: int) -> str:
    """The input channel of an evaluate job's index-th model (the container reads them in order)."""
    return f"model-{index}"


def _channel(name: str, uri: str) -> dict[str, Any]:
    return {
        "ChannelName": name,
        "DataSource": {
            "S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": uri, "S3DataDistributionType": "FullyReplicated"}
        },
    }


# What SageMaker answers about a training job it has no such job for (or none in a state to act on).
NO_SUCH_TRAINING_JOB = ("ResourceNotFound", "ValidationException")


def sagemaker_call(call: Any, **params: str) -> bool:
    """Make one SageMaker call on a training or tuning job; False when SageMaker has no such job."""
    from botocore.exceptions import ClientError

    try:
        call(**params)
    except ClientError as exc:
        if exc.response["Error"].get("Code") in NO_SUCH_TRAINING_JOB:
            return False
        raise
    return True


def training_job_exists(sagemaker: Any, name: str) -> bool:
    return sagemaker_call(sagemaker.describe_training_job, TrainingJobName=name)


def stop_training_job(sagemaker: Any, name: str) -> bool:
    """Ask SageMaker to stop a training job; False when there is none running to stop (not yet
    created, or already ended: its own end event settles the job)."""
    return sagemaker_call(sagemaker.stop_training_job, TrainingJobName=name)
