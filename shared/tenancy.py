"""Tenant ids are opaque: the identity provider's `sub` claim, any string at all.

A tenant enters the service once, at its edge, through `owner_of`: the `sub` becomes its owner
value, its encoding, and from then on every record's `owner`, every key built from it, every
S3 prefix, every SageMaker tag value is that one value. Letters, digits, `_` and `-` stand for
themselves, `.` too except at the start (so no path segment is `.` or `..`), and every other
UTF-8 byte is `=XX` (upper-case hex). The encoding is injective (`=` itself is always escaped)
and its alphabet, `A-Z a-z 0-9 _ . - =`, is valid in S3 keys, in SageMaker tag values and
around any separator (`#`, `/`, `|`), so no two tenants ever share a key or a prefix, and
`auth0|...` is as good a tenant as `alice`.

Values the service itself owns lie outside the encoding's range: the public base models are
owned by PUBLIC_OWNER, which no `sub` encodes to (a `(` is always escaped), so a tenant named
`public` owns only its own things.
"""

from __future__ import annotations

import re

ESCAPE = "="
# SageMaker's limit on a tag value, the tightest of the places an encoded tenant goes.
MAX_ENCODED_LENGTH = 256
_PLAIN = re.compile(r"[A-Za-z0-9_-]")
ENCODED_PATTERN = re.compile(r"(?:[A-Za-z0-9_-]|=[0-9A-F]{2})(?:[A-Za-z0-9_.-]|=[0-9A-F]{2})*")
# The owner of the public base models: not a match of ENCODED_PATTERN, so no tenant's owner value.
PUBLIC_OWNER = "(public)"


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
    if not isinstance(encoded, str) or not ENCODED_PATTERN.fullmatch(encoded):
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


def owner_of(tenant: object) -> str:
    """The owner value of a `sub`: what every record, key, prefix and tag of this tenant holds."""
    return encode_tenant(check_tenant(tenant))


def is_owner(value: object) -> bool:
    """Whether a value (from an event, a key, a record) is some tenant's owner value."""
    return (isinstance(value, str) and len(value) <= MAX_ENCODED_LENGTH and decode_tenant(value) is not None)


def data_prefix(owner: str) -> str:
    """The key prefix of a tenant's data in the data bucket: `<owner>/`."""
    if not is_owner(owner):
        raise InvalidTenant(f"{owner!r} is no tenant's owner value")
    return f"{owner}/"


def data_uri_prefix(bucket: str, owner: str) -> str:
    return f"s3://{bucket}/{data_prefix(owner)}"


def owns_uri(uri: str, bucket: str, owner: str) -> bool:
    """Whether a caller-given s3:// URI names something strictly inside the tenant's data prefix."""
    prefix = data_uri_prefix(bucket, owner)
    rest = uri[len(prefix):]
    return uri.startswith(prefix) and bool(rest.strip("/")) and not {".", ".."} & set(rest.split("/"))


def owner_of_key(key: str) -> str | None:
    """The owner whose data prefix holds a data-bucket key; None when the key is in no tenant's prefix."""
    segment = key.split("/", 1)[0]
    return segment if "/" in key and is_owner(segment) else None
