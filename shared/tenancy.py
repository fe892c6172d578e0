"""Tenant ids are opaque: the identity provider's `sub` claim, any string at all.

Wherever a tenant becomes part of a composed name (an S3 prefix, a DynamoDB key built from
several parts, a SageMaker tag value) it goes in encoded, never raw: letters, digits, `_`
and `-` stand for themselves, `.` too except at the start (so no path segment is `.` or
`..`), and every other UTF-8 byte is `=XX` (upper-case hex). The encoding is injective
(`=` itself is always escaped) and its alphabet, `A-Z a-z 0-9 _ . - =`, is valid in S3 keys,
in SageMaker tag values and around any separator (`#`, `/`, `|`), so no two tenants ever
share a key or a prefix, and `auth0|...` is as good a tenant as `alice`.

Records keep the raw tenant in their `owner` attribute (a whole value, never a composed one).
"""

from __future__ import annotations

import re

ESCAPE = "="
# SageMaker's limit on a tag value, the tightest of the places an encoded tenant goes.
MAX_ENCODED_LENGTH = 256
_PLAIN = re.compile(r"[A-Za-z0-9_-]")
ENCODED_PATTERN = re.compile(r"(?:[A-Za-z0-9_-]|=[0-9A-F]{2})(?:[A-Za-z0-9_.-]|=[0-9A-F]{2})*")


class InvalidTenant(ValueError):
    """An identity that cannot be a tenant: not a string, empty, or too long once encoded."""


def encode_tenant(tenant: str) -> str:
    out = []
    for i, char in enumerate(tenant):
        if _PLAIN.fullmatch(char) or (char == "." and i > 0):
            out.append(char)
        else:
            out.extend(f"{ESCAPE}{byte:02X}" for byte in char.encode("utf-8"))
    return "".join(out)


def decode_tenant(encoded: str) -> str | None:
    """The tenant an encoded segment stands for; None when it is no encoding of any tenant."""
    if not ENCODED_PATTERN.fullmatch(encoded):
        return None
    raw = bytearray()
    i = 0
    while i < len(encoded):
        if encoded[i] == ESCAPE:
            raw.append(int(encoded[i + 1:i + 3], 16))
            i += 3
        else:
            raw += encoded[i].encode()
            i += 1
    try:
        tenant = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return tenant if encode_tenant(tenant) == encoded else None


def check_tenant(tenant: object) -> str:
    """The tenant itself if it can be one; InvalidTenant (with the reason) otherwise."""
    if not isinstance(tenant, str) or not tenant:
        raise InvalidTenant("the identity's sub claim must be a non-empty string")
    try:
        encoded = encode_tenant(tenant)
    except UnicodeEncodeError:
        raise InvalidTenant("the identity's sub claim is not valid Unicode text") from None
    if len(encoded) > MAX_ENCODED_LENGTH:
        raise InvalidTenant(f"the identity's sub claim is too long to be a tenant (at most {MAX_ENCODED_LENGTH} "
                            "characters once encoded)")
    return tenant
