"""The Fusion HTTP API as the command line calls it: a client with the caller's bearer token, and
the one error every command reports (the API's refusal, or an API that cannot be reached)."""

from __future__ import annotations

from typing import Any, TypeVar

import requests
from pydantic import BaseModel, ValidationError

from shared.responses import ErrorResponse

DEFAULT_API_URL = "http://127.0.0.1:8080"
TIMEOUT_S = 30
Answer = TypeVar("Answer", bound=BaseModel)


class ApiError(Exception):
    """The API's refusal ({"error": {"code", "message", "details"}}) or an unreachable API."""

    def __init__(self, message: str, code: str = "", details: list[dict[str, str]] | None = None, status: int = 0):
        super().__init__(message)
        self.message, self.code, self.details, self.status = message, code, details or [], status

    def line(self) -> str:
        fields = "; ".join(d.get("field", "") if d.get("message", "") in self.message else
                           f"{d.get('field')}: {d.get('message')}" for d in self.details)
        return f"{self.message}" + (f" ({fields})" if fields else "")


class Client:
    """The HTTP API, with the caller's bearer token."""

    def __init__(self, api_url: str, token: str | None = None):
        self.api_url = api_url.rstrip("/")
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def call(self, method: str, path: str, answer: type[Answer], body: dict[str, Any] | None = None) -> Answer:
        """The API's answer read with its response model; a refusal raises ApiError."""
        payload = self._send(method, path, body)
        try:
            return answer.model_validate(payload)
        except ValidationError as error:
            problem = error.errors()[0]
            where = ".".join(str(p) for p in problem["loc"]) or "body"
            raise ApiError(f"the API answered {method} {path} with a body that is not a {answer.__name__} "
                           f"({where}: {problem['msg']}): is it a Fusion API?") from None

    def _send(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        try:
            response = self.session.request(method, self.api_url + path, json=body, timeout=TIMEOUT_S)
        except requests.ConnectionError:
            raise ApiError(f"cannot reach the Fusion API at {self.api_url}: start it with `fusion serve` "
                           "or pass --api-url") from None
        try:
            payload = response.json()
        except ValueError:
            payload = {}
        if response.status_code >= 400:
            try:
                error = ErrorResponse.model_validate(payload).error
            except ValidationError:
                error = None
            if error is not None:
                raise ApiError(error.message or response.reason, error.code,
                               [d.model_dump() for d in error.details], response.status_code)
            message = payload.get("message") if isinstance(payload, dict) else None  # API Gateway's own refusals
            raise ApiError(f"HTTP {response.status_code}: {message or response.reason}", status=response.status_code)
        return payload
