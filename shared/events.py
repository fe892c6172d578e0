"""Fusion's own domain events on its EventBridge bus, so pipelines can chain on them."""

from __future__ import annotations

import json
import os
from typing import Any

SOURCE = "fusion"
JOB_STATE_CHANGE = "Fusion Job State Change"
MODEL_REGISTERED = "Fusion Model Registered"
JOB_REQUESTED = "Fusion Job Requested"  # accepted, from pipelines: {"owner", "request": <POST /jobs body>}
JOB_REJECTED = "Fusion Job Rejected"  # the answer to a requested job that failed validation


class Bus:
    """The Fusion event bus (EVENT_BUS_NAME); the client is created on first publish."""

    def __init__(self, name: str | None = None, *, session: Any = None, client: Any = None):
        self._name = name
        self._session = session
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            if self._session is None:
                import boto3

                self._session = boto3.session.Session()
            self._client = self._session.client("events")
        return self._client

    def publish(self, detail_type: str, detail: dict[str, Any]) -> None:
        entry = {
            "Source": SOURCE,
            "DetailType": detail_type,
            "Detail": json.dumps(detail, default=str),
            "EventBusName": self._name or os.environ["EVENT_BUS_NAME"],
        }
        response = self.client.put_events(Entries=[entry])
        if response.get("FailedEntryCount"):
            raise RuntimeError(f"EventBridge refused {detail_type}: {response['Entries']}")

    def job_state_changed(self, job: dict[str, Any]) -> None:
        self.publish(JOB_STATE_CHANGE, {
            k: job.get(k) for k in ("job_id", "type", "status", "owner", "output_model_id", "failure_reason", "bill")
        })

    def job_rejected(self, owner: str | None, request: Any, error: dict[str, Any]) -> None:
        self.publish(JOB_REJECTED, {"owner": owner, "request": request, "error": error})

    def model_registered(self, model: dict[str, Any]) -> None:
        self.publish(MODEL_REGISTERED, {
            k: model.get(k)
            for k in ("model_id", "name", "owner", "kind", "parent_id", "job_id", "parameters", "depth",
                      "perplexity", "artifact_uri", "cost")
        })
