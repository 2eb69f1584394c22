"""Masking credentials before a value reaches a message, a log line or a record.

Secrets never appear in a job, a log line or a sidecar, yet URLs with a password in them do reach
us: a broker URL, an output URI typed with keys in it, a refused job. One rule masks them all:
the whole user-info part of a URL (an S3 access key id is as private as its password) and any
`password=` query parameter.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"

# `scheme://user:password@host`, `scheme://:password@host`, `scheme://token@host`; `;` separates
# the URLs of a sentinel list.
_USERINFO_RE = re.compile(r"://[^/@?#;\s]*@")
_QUERY_PASSWORD_RE = re.compile(r"([?&;]password=)[^&;#\s]*", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with every URL's user info and every `password=` parameter masked."""
    return _QUERY_PASSWORD_RE.sub(rf"\1{MASK}", _USERINFO_RE.sub(f"://{MASK}@", text))


def redact_credentials(value: Any) -> Any:
    """A JSON value with `redact` applied to every string in it, keys included."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_credentials(k): redact_credentials(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_credentials(v) for v in value]
    return value
