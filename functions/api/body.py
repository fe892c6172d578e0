"""Request bodies: JSON only, parsed strictly.

A body is a JSON document sent as `application/json`; anything else (a form, multipart, no
content type at all) is a 415 before any route sees it. The parser refuses what `json.loads` would let through to a
fault later: a key given twice (no last-wins), nesting deeper than any request has, numbers
with more digits than any setting takes, and the non-JSON constants NaN and Infinity.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_DEPTH = 32  # the deepest request body is three objects deep
MAX_NUMBER_DIGITS = 40  # far beyond every bound of the settings
_BRACKETS_OUTSIDE_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


def is_json(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == "application/json"


def unsupported(event: dict[str, Any]) -> str | None:
    """The content type of an event whose body is not JSON (so 415), or None when it is JSON or empty."""
    if not event.get("body"):
        return None
    headers = {str(k).lower(): v for k, v in (event.get("headers") or {}).items()}
    content_type = str(headers.get("content-type") or "")
    return None if is_json(content_type) else content_type


def _fail(message: str, doc: str, pos: int = 0) -> json.JSONDecodeError:
    return json.JSONDecodeError(message, doc, pos)


def loads(text: str | bytes | bytearray) -> Any:
    """json.loads, refusing duplicate keys, deep nesting, huge numbers and NaN/Infinity with a
    JSONDecodeError whose message says which (the API answers it as a 422 on the body)."""
    if isinstance(text, (bytes, bytearray)):
        text = text.decode("utf-8")
    depth = 0
    for match in _BRACKETS_OUTSIDE_STRINGS.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise _fail(f"nested deeper than {MAX_DEPTH} levels", text, match.start())
        elif token in "]}":
            depth -= 1

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                raise _fail(f"duplicate key {key!r}", text)
            out[key] = value
        return out

    def integer(digits: str) -> int:
        if len(digits.lstrip("-")) > MAX_NUMBER_DIGITS:
            raise _fail(f"a number of {len(digits.lstrip('-'))} digits (at most {MAX_NUMBER_DIGITS})", text)
        return int(digits)

    def real(digits: str) -> float:
        value = float(digits)
        if len(digits) > 2 * MAX_NUMBER_DIGITS or not math.isfinite(value):
            raise _fail(f"the number {digits[:50]} is out of range", text)
        return value

    def constant(name: str) -> Any:
        raise _fail(f"{name} is not a JSON value", text)

    return json.loads(text, object_pairs_hook=pairs, parse_int=integer, parse_float=real, parse_constant=constant)
