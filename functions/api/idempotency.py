"""Idempotency-Key for POST /jobs: Powertools idempotency on the IDEMPOTENCY_TABLE (DynamoDB).

Imported on the first request that carries the header, not at cold start. The key is scoped to
the tenant's owner value (encoded, so a `#` in a tenant id cannot reach into another tenant's keys): two
tenants choosing the same key never meet; the body is the payload checked
against what the key was first used with.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any, Callable

from aws_lambda_powertools.utilities.idempotency import DynamoDBPersistenceLayer, IdempotencyConfig, idempotent_function
from aws_lambda_powertools.utilities.idempotency.exceptions import (
    IdempotencyAlreadyInProgressError,
    IdempotencyValidationError,
)

from functions.api import context
from shared.errors import JobError

KEY_LIFETIME_SECONDS = 24 * 3600


@cache
def _persistence(table_name: str) -> DynamoDBPersistenceLayer:
    return DynamoDBPersistenceLayer(table_name=table_name, boto3_session=context.session())


def once(owner: str, key: str, body: dict[str, Any], create: Callable[[], dict[str, Any]], *,
         lambda_context: Any = None) -> dict[str, Any]:
    """The job `create` makes the first time (owner, key) is seen; the stored answer after that."""
    config = IdempotencyConfig(event_key_jmespath="key", payload_validation_jmespath="body",
                               expires_after_seconds=KEY_LIFETIME_SECONDS)
    if lambda_context is not None:  # so a request cut off by its timeout frees its key
        config.register_lambda_context(lambda_context)

    @idempotent_function(data_keyword_argument="request", persistence_store=_persistence(os.environ["IDEMPOTENCY_TABLE"]),
                         config=config)
    def create_once(request: dict[str, Any]) -> dict[str, Any]:
        return create()

    try:
        return create_once(request={"key": f"{owner}#{key}", "body": body})
    except IdempotencyValidationError:
        raise JobError(409, "idempotency_key_reused",
                       "this Idempotency-Key was already used with a different request body; use a new key "
                       "for a new job", [{"field": "idempotency-key", "message": "already used with another body"}]) from None
    except IdempotencyAlreadyInProgressError:
        raise JobError(409, "idempotency_key_in_progress",
                       "a request with this Idempotency-Key is still being processed; retry shortly",
                       [{"field": "idempotency-key", "message": "in progress"}]) from None
