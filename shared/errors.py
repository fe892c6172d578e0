"""The refusals the service answers with: a status, a code, a message and the fields at fault, in words."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared.settings import NAME_PATTERN, NAME_RULE


@dataclass
class JobError(Exception):
    """A request the service refuses, with the HTTP status and the fields at fault."""

    status: int
    code: str
    message: str
    details: list[dict[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def not_found(what: str, field_name: str, value: str) -> JobError:
    return JobError(404, f"{what}_not_found", f"{what} {value!r} was not found",
                    [{"field": field_name, "message": f"no {what} {value!r} in your catalog"}])


def invalid(field_name: str, message: str) -> JobError:
    return JobError(422, "invalid_request", message, [{"field": field_name, "message": message}])


# Patterns said in words, not as a regex (shared.settings).
_PATTERN_RULES = {NAME_PATTERN: NAME_RULE}

# Tags pydantic puts in an error location for the branch of a discriminated union.
_UNION_TAGS = {"train", "contract", "evaluate", "request"}


def describe_error(error: dict[str, Any]) -> dict[str, str]:
    """One pydantic (or Powertools request) validation error as {"field", "message"} in words."""
    loc = [str(p) for p in error.get("loc", ())]
    kind = error.get("type", "")
    if loc and loc[0] in ("body", "query", "path"):
        source, loc = loc[0], loc[1:]
    else:
        source = "body"
    if kind == "json_invalid":
        return {"field": "body", "message": f"malformed JSON: {error.get('ctx', {}).get('error', 'cannot parse')}"}
    loc = [p for p in loc if p not in _UNION_TAGS]
    field = ".".join(loc) or source
    if kind == "extra_forbidden":
        message = f"'{loc[-1] if loc else field}' is not a known field"
    elif kind == "missing":
        message = "is required"
    elif kind == "string_pattern_mismatch" and error.get("ctx", {}).get("pattern") in _PATTERN_RULES:
        message = f"must be {_PATTERN_RULES[error['ctx']['pattern']]}"
    elif kind == "union_tag_invalid" or kind == "union_tag_not_found":
        field, message = "type", "type must be 'train' or 'contract'"
    else:
        message = error.get("msg", "is invalid")
    return {"field": field, "message": message}
