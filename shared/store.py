"""DynamoDB data access: jobs, the model catalog and the datasets lookup.

Each class wraps one table. Clients are passed in or created lazily on first use, so importing
this module costs nothing and tests can hand in a moto-backed session. Records keep the fields
that conditions and indexes need as top-level attributes and the rest of the document as one
JSON string, so floats and nested settings round-trip without DynamoDB's number rules.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from typing import Any

from shared.lifecycle import ACTIVE_STATUSES, END_STATUSES, STATUS_RANK
from shared.shapes import SIZES
from shared.tenancy import PUBLIC_OWNER

BASE_PREFIX = "base-"
BY_OWNER_INDEX = "by-owner"
BY_STATUS_INDEX = "by-status"  # jobs only: job_id by status

# What S3 answers for a key that does not exist: NoSuchKey (404) to a caller that may list the
# bucket, AccessDenied (403) to one that may not (a role without s3:ListBucket).
MISSING_OBJECT = ("NoSuchKey", "404", "NotFound", "AccessDenied", "403")


def missing_object(exc: BaseException) -> bool:
    """Whether an S3 error says the key is not there, as AWS answers with or without ListBucket."""
    from botocore.exceptions import ClientError

    return isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in MISSING_OBJECT


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ConditionFailed(Exception):
    """A conditional write lost: the record was already in (or past) the wanted state."""


class OverBudget(Exception):
    """Accepting the job would take its tenant's committed spend past their limit."""


def cents(amount: Any) -> int:
    """A decimal USD amount (string or Decimal, already rounded to cents) as integer cents."""
    from decimal import Decimal

    return int((Decimal(str(amount)) * 100).to_integral_value())


class _Table:
    """Lazily bound DynamoDB table of one environment variable's name."""

    env_var = ""

    def __init__(self, table_name: str | None = None, *, session: Any = None, client: Any = None):
        self._name = table_name
        self._session = session
        self._client = client

    @property
    def name(self) -> str:
        return self._name or os.environ[self.env_var]

    @property
    def client(self) -> Any:
        if self._client is None:
            if self._session is None:
                import boto3

                self._session = boto3.session.Session()
            self._client = self._session.client("dynamodb")
        return self._client

    def _get(self, key: dict[str, str]) -> dict[str, Any] | None:
        item = self.client.get_item(TableName=self.name, Key=_ddb(key), ConsistentRead=True).get("Item")
        return _plain(item) if item else None

    def _query_owner(self, owner: str, limit: int) -> list[dict[str, Any]]:
        response = self.client.query(
            TableName=self.name,
            IndexName=BY_OWNER_INDEX,
            KeyConditionExpression="#o = :o",
            ExpressionAttributeNames={"#o": "owner"},
            ExpressionAttributeValues={":o": {"S": owner}},
            ScanIndexForward=False,
            Limit=limit,
        )
        return [_plain(item) for item in response.get("Items", [])]

    def _mark_deleted(self, key: dict[str, str], owner: str) -> bool:
        """Mark the owner's record deleted (deleted_at), keeping it for lineage; False when the
        owner has no such record. Marking it again changes nothing."""
        try:
            self.client.update_item(
                TableName=self.name,
                Key=_ddb(key),
                UpdateExpression="SET deleted_at = if_not_exists(deleted_at, :t)",
                ConditionExpression="#o = :o",
                ExpressionAttributeNames={"#o": "owner"},
                ExpressionAttributeValues=_ddb({":t": now(), ":o": owner}),
            )
        except self.client.exceptions.ConditionalCheckFailedException:
            return False
        return True

    def _put_new(self, key_name: str, item: dict[str, Any]) -> None:
        try:
            self.client.put_item(
                TableName=self.name,
                Item=_ddb(item),
                ConditionExpression="attribute_not_exists(#k)",
                ExpressionAttributeNames={"#k": key_name},
            )
        except self.client.exceptions.ConditionalCheckFailedException as exc:
            raise ConditionFailed(item[key_name]) from exc


def _ddb(item: dict[str, Any]) -> dict[str, dict[str, str]]:
    out = {}
    for key, value in item.items():
        if value is None:
            continue
        if isinstance(value, bool):
            out[key] = {"BOOL": value}
        elif isinstance(value, int):
            out[key] = {"N": str(value)}
        else:
            out[key] = {"S": str(value)}
    return out


def _plain(item: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, typed in item.items():
        (kind, value), = typed.items()
        out[key] = int(value) if kind == "N" else value
    return out


class Jobs(_Table):
    """The jobs table. `doc` holds the immutable request side (settings, estimate, warnings).

    Spend accounting (with the tenants table, TENANTS_TABLE): a job created with a limit first
    commits its estimate to its tenant's `spent_cents` by a conditional add that fails past the
    limit (so two concurrent jobs cannot both squeeze under it), then is stored; the write that
    ends a job replaces its estimate by its bill in the same transaction as the status change, so
    the counter settles exactly once per job however often the end event is delivered.
    """

    env_var = "JOBS_TABLE"

    def create(self, job: dict[str, Any], *, limit_cents: int | None = None) -> None:
        """Store a new job; with `limit_cents`, also commit its estimate to its tenant's spend."""
        if limit_cents is None or not os.environ.get(Tenants.env_var):
            self._put_new("job_id", _job_item(job))
            return
        committed = cents(job["estimate"]["total"])
        tenants_table, tenant_key = os.environ[Tenants.env_var], _ddb({"tenant": job["owner"]})
        try:
            self.client.update_item(
                TableName=tenants_table, Key=tenant_key, UpdateExpression="ADD spent_cents :c",
                ConditionExpression="attribute_not_exists(spent_cents) OR spent_cents <= :most",
                ExpressionAttributeValues=_ddb({":c": committed, ":most": limit_cents - committed}),
            )
        except self.client.exceptions.ConditionalCheckFailedException as exc:
            raise OverBudget(job["owner"]) from exc
        try:
            self._put_new("job_id", {**_job_item(job), "committed_cents": committed})
        except BaseException:
            # Not stored: give the commitment back. (Were this process to die right here, the
            # counter would stay over by this estimate: a tenant refused early, never one overspent.)
            self.client.update_item(TableName=tenants_table, Key=tenant_key, UpdateExpression="ADD spent_cents :c",
                                    ExpressionAttributeValues=_ddb({":c": -committed}))
            raise

    def get(self, job_id: str, owner: str | None = None) -> dict[str, Any] | None:
        item = self._get({"job_id": job_id})
        if item is None or (owner is not None and item["owner"] != owner):
            return None
        return _job_from_item(item)

    def list(self, owner: str, limit: int = 100) -> list[dict[str, Any]]:
        return [_job_from_item(item) for item in self._query_owner(owner, limit)]

    def in_flight(self, statuses: tuple[str, ...] = ACTIVE_STATUSES) -> list[dict[str, Any]]:
        """Every job launching, running or cancelling (or in `statuses`; all pages), for the
        reconciler: a query of the status index per status, so its cost follows the jobs in flight,
        not the table. The index is eventually consistent: a job that moved a moment ago may be
        missed or seen in its old status; the reconciler's writes are conditional and its next run
        sees it."""
        items = []
        for status in statuses:
            start = None
            while True:
                page = {"ExclusiveStartKey": start} if start else {}
                response = self.client.query(
                    TableName=self.name, IndexName=BY_STATUS_INDEX, KeyConditionExpression="#s = :s",
                    ExpressionAttributeNames={"#s": "status"}, ExpressionAttributeValues=_ddb({":s": status}), **page,
                )
                items += [_plain(item) for item in response.get("Items", [])]
                start = response.get("LastEvaluatedKey")
                if not start:
                    break
        return items

    def transition(self, job_id: str, status: str, *, only_from: tuple[str, ...] | None = None,
                   **fields: Any) -> dict[str, Any]:
        """Move a job forward to `status`, setting `fields` with it; ConditionFailed otherwise (also
        when the job is no longer in one of `only_from`, where given).

        Returns the job as it is after the write.
        """
        earlier = [s for s, rank in STATUS_RANK.items() if rank < STATUS_RANK[status]
                   and (only_from is None or s in only_from)]
        return self._update(job_id, {"status": status, **fields}, earlier)

    def annotate(self, job_id: str, allowed: tuple[str, ...], **fields: Any) -> dict[str, Any]:
        """Set fields without changing status, only while the job is in one of `allowed`."""
        return self._update(job_id, fields, list(allowed))

    def _update(self, job_id: str, fields: dict[str, Any], allowed: list[str]) -> dict[str, Any]:
        if not allowed:
            raise ConditionFailed(job_id)
        if fields.get("status") in END_STATUSES and "bill" in fields and os.environ.get(Tenants.env_var):
            item = self._get({"job_id": job_id})
            if item is not None and "committed_cents" in item:
                return self._end(item, fields, allowed)
        fields = {**fields, "updated_at": now()}
        try:
            response = self.client.update_item(
                TableName=self.name, Key=_ddb({"job_id": job_id}), ReturnValues="ALL_NEW",
                **_update_parts(fields, allowed),
            )
        except self.client.exceptions.ConditionalCheckFailedException as exc:
            raise ConditionFailed(job_id) from exc
        return _job_from_item(_plain(response["Attributes"]))

    def _end(self, item: dict[str, Any], fields: dict[str, Any], allowed: list[str]) -> dict[str, Any]:
        """End a job and settle its tenant's spend (bill in, estimate out) in one transaction."""
        job_id = item["job_id"]
        fields = {**fields, "updated_at": now()}
        update = _update_parts(fields, allowed)
        delta = cents(fields["bill"]) - item["committed_cents"]
        try:
            self.client.transact_write_items(TransactItems=[
                {"Update": {"TableName": self.name, "Key": _ddb({"job_id": job_id}), **update}},
                {"Update": {"TableName": os.environ[Tenants.env_var], "Key": _ddb({"tenant": item["owner"]}),
                            "UpdateExpression": "ADD spent_cents :d", "ExpressionAttributeValues": _ddb({":d": delta})}},
            ])
        except self.client.exceptions.TransactionCanceledException as exc:
            reasons = [r.get("Code") for r in exc.response.get("CancellationReasons", [])]
            if reasons[:1] == ["ConditionalCheckFailed"]:
                raise ConditionFailed(job_id) from exc
            raise
        return _job_from_item(self._get({"job_id": job_id}))


def _update_parts(fields: dict[str, Any], allowed: list[str]) -> dict[str, Any]:
    """UpdateExpression, condition and values that set `fields` while the status is one of `allowed`."""
    names = {f"#f{i}": k for i, k in enumerate(fields)}
    values = {f":v{i}": v for i, v in enumerate(fields.values())}
    values.update({f":s{i}": s for i, s in enumerate(allowed)})
    names["#status"] = "status"
    sets = ", ".join(f"#f{i} = :v{i}" for i in range(len(fields)))
    allowed_list = ", ".join(f":s{i}" for i in range(len(allowed)))
    return {"UpdateExpression": f"SET {sets}",
            "ConditionExpression": f"attribute_exists(job_id) AND #status IN ({allowed_list})",
            "ExpressionAttributeNames": names, "ExpressionAttributeValues": _ddb(values)}


# published_status: the last status announced on the bus. It trails `status` between a state
# write and its event, so a retry that finds them apart publishes again (at least once).
# artifact_uri: what SageMaker wrote, kept on the job even when no model could be registered.
# trials: a tuning's ranked trials, written as it ends (shared.tunings); evaluation: an evaluate
# job's table, written with its end state (shared.state_changes); stopped: a cancelled job's last
# reported step of its total (shared.state_changes). All are documents, stored as JSON text
# (json_column) and read back parsed.
_JOB_COLUMNS = (
    "job_id", "owner", "status", "type", "created_at", "updated_at", "training_job_name",
    "output_model_id", "failure_reason", "bill", "published_status", "artifact_uri", "trials", "evaluation",
    "stopped",
)
_JSON_COLUMNS = ("trials", "evaluation", "stopped")


def json_column(document: Any) -> str:
    """A document as a job's JSON column stores it (a string attribute)."""
    return json.dumps(document, separators=(",", ":"))


def _job_item(job: dict[str, Any]) -> dict[str, Any]:
    item = {k: job.get(k) for k in _JOB_COLUMNS}
    item["doc"] = json.dumps({k: v for k, v in job.items() if k not in _JOB_COLUMNS and k != "progress"})
    return item


def _job_from_item(item: dict[str, Any]) -> dict[str, Any]:
    job = {k: item.get(k) for k in _JOB_COLUMNS}
    for k in _JSON_COLUMNS:
        if isinstance(job[k], str):
            job[k] = json.loads(job[k])
    job.update(json.loads(item.get("doc", "{}")))
    return job


class Catalog(_Table):
    """The model catalog: base models (owner PUBLIC_OWNER) and each tenant's trained models."""

    env_var = "MODELS_TABLE"

    def register(self, model: dict[str, Any]) -> bool:
        """Add a model once: False when a model with this id is already registered."""
        try:
            self._put_new("model_id", _model_item(model))
        except ConditionFailed:
            return False
        return True

    def get(self, model_id: str, owner: str) -> dict[str, Any] | None:
        """The model if the caller may see it: their own or a public base model."""
        base = base_model(model_id, artifacts_bucket=os.environ.get("ARTIFACTS_BUCKET", ""))
        if base is not None:
            return base
        item = self._get({"model_id": model_id})
        if item is None or item["owner"] not in (owner, PUBLIC_OWNER):
            return None
        return _model_from_item(item)

    def list(self, owner: str, limit: int = 100) -> list[dict[str, Any]]:
        """The public base models, then the caller's own. Every named size is listed whether or not
        the table holds it (a deployed stack's does not): get() serves them the same way."""
        public = [_model_from_item(item) for item in self._query_owner(PUBLIC_OWNER, limit)]
        listed = {model["model_id"] for model in public}
        bucket = os.environ.get("ARTIFACTS_BUCKET", "")
        public += [base_model(f"{BASE_PREFIX}{size}", artifacts_bucket=bucket) for size in SIZES
                   if f"{BASE_PREFIX}{size}" not in listed]
        own = [_model_from_item(item) for item in self._query_owner(owner, limit)]
        return public + [model for model in own if model["status"] != "deleted"]

    def delete(self, model_id: str, owner: str) -> bool:
        """Take the owner's model out of the catalog; its record stays, marked deleted, so that its
        children still name their parent. False when the owner has no such model."""
        return self._mark_deleted({"model_id": model_id}, owner)


_MODEL_COLUMNS = ("model_id", "owner", "name", "kind", "created_at", "job_id")


def _model_item(model: dict[str, Any]) -> dict[str, Any]:
    item = {k: model.get(k) for k in _MODEL_COLUMNS}
    item["doc"] = json.dumps({k: v for k, v in model.items() if k not in _MODEL_COLUMNS})
    return item


def _model_from_item(item: dict[str, Any]) -> dict[str, Any]:
    model = {k: item.get(k) for k in _MODEL_COLUMNS}
    model.update(json.loads(item.get("doc", "{}")))
    if item.get("deleted_at"):  # lineage only: what it was, not where its weights were
        model.update(status="deleted", deleted_at=item["deleted_at"], artifact_uri=None)
    else:
        model.setdefault("status", "ready")
    return model


def base_model(model_id: str, *, artifacts_bucket: str) -> dict[str, Any] | None:
    """The public base model `base-<size>` for each named size, or None for any other id."""
    if not model_id.startswith(BASE_PREFIX) or model_id[len(BASE_PREFIX):] not in SIZES:
        return None
    size = model_id[len(BASE_PREFIX):]
    config = SIZES[size]
    return {
        "model_id": model_id,
        "name": model_id,
        "owner": PUBLIC_OWNER,
        "kind": "base",
        "parent_id": None,
        "job_id": None,
        "parameters": config.parameters(),
        "depth": config.n_layers,
        "family": config.family,
        "context_length": config.context_length,
        "perplexity": None,
        "artifact_uri": f"s3://{artifacts_bucket}/base-models/{size}/model.tar.gz",
        "cost": None,
        "config": config.model_dump(mode="json"),
        "dataset": None,
        "created_at": "1970-01-01T00:00:00.000Z",
    }


# Base-model archives seen published in this process: an operator's upload stays, so each is
# looked for until found, then no more.
_PUBLISHED: set[str] = set()


def not_available(model_id: str) -> str:
    return (f"{model_id} is not available: its weights are not published in this deployment "
            f"(GET /models shows which base models are available)")


def available(model: dict[str, Any], s3: Any) -> bool:
    """Whether a catalog model's weights exist. The catalog offers every named base size whether or
    not the operator uploaded it (base-models/<size>/model.tar.gz), so for those the archive is
    looked for; every other entry was registered from an artifact that was there."""
    uri = model.get("artifact_uri")
    if base_model(model.get("model_id") or "", artifacts_bucket="") is None or not uri:
        return True
    if uri in _PUBLISHED:
        return True
    from botocore.exceptions import ClientError

    bucket, key = uri[len("s3://"):].split("/", 1)
    try:
        s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if missing_object(exc):
            return False
        raise
    _PUBLISHED.add(uri)
    return True


def seed_base_models(catalog: Catalog, *, artifacts_bucket: str | None = None) -> list[str]:
    """Write the public base models into the catalog (idempotent); returns their ids."""
    bucket = artifacts_bucket or os.environ["ARTIFACTS_BUCKET"]
    ids = []
    for size in SIZES:
        model = base_model(f"{BASE_PREFIX}{size}", artifacts_bucket=bucket)
        catalog.register(model)
        ids.append(model["model_id"])
    return ids


class Datasets(_Table):
    """The datasets table: what each tenant registered, the check's verdict on it, and the object the
    check admitted (s3_etag, s3_version_id), which is what a job trains on."""

    env_var = "DATASETS_TABLE"

    def register(self, dataset: dict[str, Any]) -> None:
        self._put_new("dataset_id", dataset)

    def get(self, dataset_id: str, owner: str) -> dict[str, Any] | None:
        """The dataset if it is the caller's, else None; a deleted one has status "deleted"."""
        item = self._get({"dataset_id": dataset_id})
        if item is None or item.get("owner") != owner:
            return None
        return _dataset_from_item(item)

    def list(self, owner: str, limit: int = 100) -> list[dict[str, Any]]:
        """The caller's datasets not deleted, newest first."""
        items = [_dataset_from_item(item) for item in self._query_owner(owner, limit)]
        return sorted((d for d in items if d["status"] != "deleted"), key=lambda d: d.get("created_at", ""),
                      reverse=True)

    def delete(self, dataset_id: str, owner: str) -> bool:
        """Mark the owner's dataset deleted (its object is removed by the caller); the record stays
        so that models trained on it still name it. False when the owner has no such dataset."""
        return self._mark_deleted({"dataset_id": dataset_id}, owner)

    def record_check(self, dataset_id: str, owner: str, *, ok: bool, bytes_read: int, tokens: int,
                     reason: str | None, etag: str | None = None, version_id: str | None = None,
                     status: str | None = None, chat: dict[str, Any] | None = None) -> bool:
        """Store a check's verdict (ready, rejected, or `status="failed"` when the check itself broke),
        the object it read (etag, version id), and a conversation dataset's figures (chat, kept as
        JSON); False when this owner registered no such dataset
        (a stray upload) or it is already ready or replaced: a ready dataset is pinned to the object
        it was checked on, so a later upload never makes it ready on other bytes (see mark_replaced)."""
        status = status or ("ready" if ok else "rejected")
        values = {":s": status, ":b": bytes_read, ":t": tokens, ":o": owner, ":ready": "ready", ":replaced": "replaced"}
        update = "SET #s = :s, #b = :b, tokens = :t"
        if chat is not None:
            update += ", chat = :chat"
            values[":chat"] = json.dumps(chat, separators=(",", ":"))
        for name, value in (("s3_etag", etag), ("s3_version_id", version_id)):
            if value:
                update += f", {name} = :{name}"
                values[f":{name}"] = value
        if reason:
            update += ", reason = :r"
            values[":r"] = reason
        else:
            update += " REMOVE reason"
        if not version_id:
            update += (", " if " REMOVE " in update else " REMOVE ") + "s3_version_id"
        if chat is None:
            update += (", " if " REMOVE " in update else " REMOVE ") + "chat"
        try:
            self.client.update_item(
                TableName=self.name,
                Key=_ddb({"dataset_id": dataset_id}),
                UpdateExpression=update,
                ConditionExpression="#o = :o AND #s <> :ready AND #s <> :replaced",
                ExpressionAttributeNames={"#s": "status", "#b": "bytes", "#o": "owner"},
                ExpressionAttributeValues=_ddb(values),
            )
        except self.client.exceptions.ConditionalCheckFailedException:
            return False
        return True

    def mark_replaced(self, dataset_id: str, owner: str, *, etag: str | None, version_id: str | None) -> bool:
        """A ready dataset whose object a later upload replaced (another etag or version than the one
        checked) becomes "replaced": no job is admitted on it. False when it is not this owner's,
        not ready, or the upload is the very object it was checked on (a repeated notification)."""
        values = {":o": owner, ":ready": "ready", ":replaced": "replaced", ":e": etag or "",
                  ":r": REPLACED_REASON}
        condition = "#o = :o AND #s = :ready AND attribute_exists(s3_etag) AND (s3_etag <> :e"
        if version_id:
            values[":v"] = version_id
            condition += " OR s3_version_id <> :v"
        try:
            self.client.update_item(
                TableName=self.name,
                Key=_ddb({"dataset_id": dataset_id}),
                UpdateExpression="SET #s = :replaced, reason = :r",
                ConditionExpression=condition + ")",
                ExpressionAttributeNames={"#s": "status", "#o": "owner"},
                ExpressionAttributeValues=_ddb(values),
            )
        except self.client.exceptions.ConditionalCheckFailedException:
            return False
        return True


REPLACED_REASON = ("a later upload replaced the object its check admitted; register a new dataset "
                   "(POST /datasets) to train on the new bytes")


def _dataset_from_item(item: dict[str, Any]) -> dict[str, Any]:
    if item.get("deleted_at"):
        item = {**item, "status": "deleted"}
    if isinstance(item.get("chat"), str):
        item = {**item, "chat": json.loads(item["chat"])}
    return item


class Tenants(_Table):
    """Per tenant: the spend limit operators may set (budget_usd, a decimal string) and the spend
    committed so far (spent_cents: estimates of live jobs + bills of ended ones), kept by Jobs."""

    env_var = "TENANTS_TABLE"

    def get(self, tenant: str) -> dict[str, Any] | None:
        return self._get({"tenant": tenant})

    def all(self) -> list[dict[str, Any]]:
        """Every tenant's record (operators' view: a scan, paged through)."""
        items, start = [], None
        while True:
            page = self.client.scan(TableName=self.name, ConsistentRead=True,
                                    **({"ExclusiveStartKey": start} if start else {}))
            items += [_plain(item) for item in page.get("Items", [])]
            start = page.get("LastEvaluatedKey")
            if not start:
                return items

    def set_budget(self, tenant: str, budget_usd: str) -> dict[str, Any]:
        """Give a tenant a spend limit of their own (the committed spend is left as it is)."""
        item = self.client.update_item(
            TableName=self.name, Key=_ddb({"tenant": tenant}), UpdateExpression="SET budget_usd = :b",
            ExpressionAttributeValues=_ddb({":b": budget_usd}), ReturnValues="ALL_NEW")["Attributes"]
        return _plain(item)
