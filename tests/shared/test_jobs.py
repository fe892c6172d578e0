"""Job domain pieces that need no AWS: names, metrics archives, the launch request's limits."""

import io
import json

import pytest

from shared.contracts import PRECISION_ENV, Hyperparameters, TrainMetrics
from shared.lifecycle import JOB_ID_PATTERN, new_job_id
from shared.memory import Layout
from shared.outputs import model_prefix, model_uri, read_metrics
from shared.pricing import LLAMA_SHAPES, Estimate, estimate_train
from shared.settings import TrainSettings
from shared.shapes import SIZES
from shared.training_jobs import MAX_RUNTIME_LIMIT, LaunchConfig, job_id_of, training_job_request

from tests.conftest import metrics_document, tar_gz


@pytest.mark.parametrize("name, job_id", [
    ("fusion-abc-123", "abc-123"), ("fusion-", None), ("other-abc", None), ("fusion-ABC", None),
    ("fusion-" + "a" * 41, None),
])
def test_job_id_of_a_training_job(name, job_id):
    assert job_id_of(name) == job_id


def test_new_job_ids_fit_the_contract():
    ids = {new_job_id() for _ in range(50)}
    assert len(ids) == 50 and all(JOB_ID_PATTERN.fullmatch(i) for i in ids)


class FakeS3:
    def __init__(self, objects):
        self.objects = objects

    def get_object(self, Bucket, Key):
        return {"Body": io.BytesIO(self.objects[(Bucket, Key)])}


JOB = {"job_id": "j", "type": "train", "estimate": {"training_tokens": 7}}


def test_metrics_are_read_from_the_uncompressed_model_prefix():
    """CompressionType NONE: metrics.json is a file of the model prefix, whether or not SageMaker's
    reported artifact ends in "/"."""
    s3 = FakeS3({("b", "jobs/j/output/fusion-j/output/model/metrics.json"): json.dumps(metrics_document(JOB)).encode()})
    for reported in ("s3://b/jobs/j/output/fusion-j/output/model/", "s3://b/jobs/j/output/fusion-j/output/model"):
        metrics = read_metrics(s3, reported)
        assert isinstance(metrics, TrainMetrics) and metrics.training_tokens == 7
    assert model_uri("s3://b/jobs/j/output/", "fusion-j") == "s3://b/jobs/j/output/fusion-j/output/model/"
    assert model_prefix("s3://b/p/model") == "s3://b/p/model/" and model_prefix("s3://b/p/model.tar.gz") == "s3://b/p/model.tar.gz"


@pytest.mark.parametrize("member", ["metrics.json", "./metrics.json", "data/metrics.json"])
def test_metrics_of_an_archived_model_are_read_from_output_tar_beside_it(member):
    s3 = FakeS3({("b", "jobs/j/output/fusion-j/output/output.tar.gz"):
                 tar_gz({"failure": b"", member: json.dumps(metrics_document(JOB)).encode()})})
    metrics = read_metrics(s3, "s3://b/jobs/j/output/fusion-j/output/model.tar.gz")
    assert isinstance(metrics, TrainMetrics) and metrics.training_tokens == 7


@pytest.mark.parametrize("change, named", [
    ({"config": None}, "config: Field required"),
    ({"training_tokens": "7"}, "training_tokens: Input should be a valid integer"),
    ({"job_type": "grow"}, "job_type"),
])
def test_metrics_missing_a_field_or_of_a_wrong_type_are_refused_naming_it(change, named):
    document = {k: v for k, v in {**metrics_document(JOB), **change}.items() if v is not None}
    s3 = FakeS3({("b", "k/model/metrics.json"): json.dumps(document).encode()})
    with pytest.raises(ValueError, match="metrics.json does not hold to the container's metrics") as refused:
        read_metrics(s3, "s3://b/k/model/")
    assert named in str(refused.value) and "\n" not in str(refused.value)


def test_an_archive_without_metrics_is_an_error():
    s3 = FakeS3({("b", "k/output.tar.gz"): tar_gz({"other.json": b"{}"})})
    with pytest.raises(FileNotFoundError):
        read_metrics(s3, "s3://b/k/model.tar.gz")


def test_runtime_limits_stay_within_sagemakers_ceiling():
    estimate = estimate_train(TrainSettings(turns=10, cycles=100, steps_per_cycle=100_000, seq_len=8192),
                              SIZES["large"])
    job = {"job_id": "j", "type": "train", "owner": "o", "settings": TrainSettings().model_dump(mode="json"),
           "estimate": estimate.model_dump(mode="json"), "dataset_uri": "s3://d/o/x", "input_model_uri": "s3://a/m"}
    config = LaunchConfig(artifacts_bucket="a", training_image_uri="img", role_arn="arn", use_spot=True)
    stopping = training_job_request(job, config)["StoppingCondition"]
    assert stopping["MaxRuntimeInSeconds"] == MAX_RUNTIME_LIMIT
    assert stopping["MaxWaitTimeInSeconds"] == MAX_RUNTIME_LIMIT


def _launch(base, settings=TrainSettings()):
    estimate = estimate_train(settings, base)
    job = {"job_id": "j", "type": "train", "owner": "o", "settings": settings.model_dump(mode="json"),
           "estimate": estimate.model_dump(mode="json"), "dataset_uri": "s3://d/o/x", "input_model_uri": "s3://a/m"}
    config = LaunchConfig(artifacts_bucket="a", training_image_uri="img", role_arn="arn")
    return estimate, training_job_request(job, config)


def test_the_training_job_runs_the_memory_plan_and_hands_it_to_the_container():
    estimate, request = _launch(LLAMA_SHAPES["llama-70b"])
    assert request["ResourceConfig"]["InstanceType"] == "ml.p5.48xlarge"
    assert request["ResourceConfig"]["InstanceCount"] == estimate.instance_count == 4
    assert Hyperparameters.parse(request["HyperParameters"]) == Hyperparameters(
        job_type="train", job_id="j", settings=TrainSettings(),
        layout=Layout(strategy="fsdp", micro_batch=estimate.micro_batch, activation_checkpointing=True))


def test_spot_where_the_tier_says_so():
    _, on_demand = _launch(SIZES["debug"])  # tier xs
    assert on_demand["EnableManagedSpotTraining"] is False
    assert "MaxWaitTimeInSeconds" not in on_demand["StoppingCondition"]
    _, spot = _launch(LLAMA_SHAPES["llama-8b"])  # grows to 9.8B: tier l, on spot capacity
    assert spot["EnableManagedSpotTraining"] is True
    assert spot["StoppingCondition"]["MaxWaitTimeInSeconds"] > spot["StoppingCondition"]["MaxRuntimeInSeconds"]
    assert spot["CheckpointConfig"]["S3Uri"] == "s3://a/checkpoints/j/"  # an interruption resumes from there


def test_a_job_from_before_plans_launches_as_it_did():
    estimate, _ = _launch(SIZES["debug"])
    old = {k: v for k, v in estimate.model_dump(mode="json").items()
           if k not in ("strategy", "micro_batch", "activation_checkpointing", "spot")}
    assert Estimate.model_validate(old).layout() == Layout()


def test_the_container_gets_the_precision_setting_and_a_bad_one_is_refused_by_name():
    _, request = _launch(SIZES["debug"])
    assert request["Environment"] == {PRECISION_ENV: "auto"}
    with pytest.raises(ValueError, match=f"{PRECISION_ENV}='fp16'"):
        LaunchConfig(artifacts_bucket="a", training_image_uri="img", role_arn="arn", precision="fp16")
