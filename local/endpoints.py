"""SageMaker real-time endpoints on this machine: every ready catalog model answers as if
`fusion models deploy --stack` had put it on an endpoint of the local stack.

The API invokes `fusion-<model id>` with the body the serving container (Text Generation
Inference) takes, as it does in AWS (shared.serving); here the answer is sampled from the model's
archive with the CLI's own generation (`local.sampling.sample`), on the CPU. Each model's archive
is unpacked once, under the runs directory, for the life of the stack.
"""

from __future__ import annotations

import json
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.outputs import is_archive
from shared.serving import MODEL_TAG, STACK_TAG, TOP_P, chat_answer, prompt_answer, read_invocation

SEED = 0


class EndpointError(Exception):
    """An answer as SageMaker's runtime gives it: the status and the AWS error code."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class LocalEndpoints:
    """`served(endpoint name)` is the catalog model an endpoint of that name serves, or None."""

    def __init__(self, s3_client: Callable[[], Any], work_dir: Path, served: Callable[[str], dict[str, Any] | None],
                 stack: str):
        self._s3_factory, self.work_dir, self.served, self.stack = s3_client, Path(work_dir), served, stack
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def tags(self, arn: str) -> list[dict[str, str]]:
        """ListTags of an endpoint ARN: this stack's tag and the model's, as a deploy leaves them."""
        kind, _, name = arn.rpartition(":")[2].partition("/")
        model = self.served(name) if kind == "endpoint" else None
        if model is None:
            raise EndpointError(400, "ValidationException", f"Could not find endpoint \"{arn}\".")
        return [{"Key": MODEL_TAG, "Value": model["model_id"]}, {"Key": STACK_TAG, "Value": self.stack}]

    def invoke(self, name: str, body: bytes) -> Any:
        """InvokeEndpoint: TGI's answer to TGI's request, from the model the endpoint serves."""
        from local.sampling import sample

        model = self.served(name)
        if model is None:
            raise EndpointError(400, "ValidationException", f"Endpoint {name} not found.")
        try:
            asked = read_invocation(json.loads(body))
        except (ValueError, KeyError, TypeError) as error:
            raise EndpointError(424, "ModelError", f"the serving container refused the request: {error}") from None
        text = sample(self._unpacked(model), asked["prompt"] or "", max_tokens=asked["max_tokens"],
                      temperature=asked["temperature"], top_p=TOP_P, seed=SEED, chat=asked["messages"])
        return chat_answer(text, model["model_id"]) if asked["messages"] is not None else prompt_answer(text)

    def _unpacked(self, model: dict[str, Any]) -> Path:
        """The model's files (or its archive, unpacked) on this machine, fetched once (a second
        request waits for the first to finish it)."""
        with self._lock:
            lock = self._locks.setdefault(model["model_id"], threading.Lock())
        folder = self.work_dir / "endpoints" / model["model_id"]
        with lock:
            if not (folder / "model" / "config.json").is_file():
                folder.mkdir(parents=True, exist_ok=True)
                bucket, _, key = model["artifact_uri"].removeprefix("s3://").partition("/")
                s3 = self._s3_factory()
                if not is_archive(key):  # the files a job uploaded uncompressed, config.json last
                    listed = [item["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
                        Bucket=bucket, Prefix=key) for item in page.get("Contents", []) if not item["Key"].endswith("/")]
                    for name in sorted(listed, key=lambda k: k == key + "config.json"):
                        (folder / "model" / name[len(key):]).parent.mkdir(parents=True, exist_ok=True)
                        s3.download_file(bucket, name, str(folder / "model" / name[len(key):]))
                    return folder / "model"
                archive = folder / "model.tar.gz"
                s3.download_file(bucket, key, str(archive))
                with tarfile.open(archive) as tar:
                    tar.extractall(folder / "model", filter="data")
                archive.unlink()
        return folder / "model"
