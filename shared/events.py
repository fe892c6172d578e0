"""Fusion's own domain events on its EventBridge bus, so pipelines can chain on them, published at least once."""

from __future__ import annotations

import json
import os
from typing import Any

from shared.store import Catalog, ConditionFailed, Jobs

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


def announce(job: dict[str, Any], *, jobs: Jobs, bus: Any, catalog: Catalog | None = None) -> dict[str, Any]:
    """Publish the job's current state (and, once completed, its model) unless already published.

    The state write comes first and this second: if publishing fails, the job's published_status
    still trails its status, so whatever retries (the event, the message, the request) publishes
    again. Subscribers may see an event twice, never miss one; the state itself changes once.
    """
    status = job["status"]
    if job.get("published_status") == status:
        return job
    bus.job_state_changed(job)
    if status == "completed" and job.get("output_model_id") and catalog is not None:
        model = catalog.get(job["output_model_id"], job["owner"])
        if model is not None:
            bus.model_registered(model)
    try:
        return jobs.annotate(job["job_id"], (status,), published_status=status)
    except ConditionFailed:
        return job  # it moved on: whoever moved it announces the newer state
