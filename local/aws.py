"""The AWS that the local stack and the tests stand in for: its account, its region, and the
context Lambda hands each handler."""

from __future__ import annotations

import time
import uuid

# moto's account (its DEFAULT_ACCOUNT_ID): the ARNs it makes carry it, so ours do too.
LOCAL_ACCOUNT = "123456789012"
LOCAL_REGION = "us-east-1"


class LambdaContext:
    """What a Lambda handler is given as `context`: its function, request id and time left."""

    memory_limit_in_mb = 1024

    def __init__(self, function_name: str = "fusion-local", timeout_s: int = 900):
        self.function_name = function_name
        self.invoked_function_arn = f"arn:aws:lambda:{LOCAL_REGION}:{LOCAL_ACCOUNT}:function:{function_name}"
        self.aws_request_id = str(uuid.uuid4())
        self._deadline = time.monotonic() + timeout_s

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


class ApiError(Exception):
    """An error as a local service's JSON protocol (SageMaker's) returns it: HTTP 400 with the AWS error code."""

    def __init__(self, code: str, message: str, status: int = 400):
        super().__init__(message)
        self.code, self.message, self.status = code, message, status
