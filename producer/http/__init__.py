"""The HTTP API (`omni-batch serve`): jobs, outcomes and OpenAI-style image generation over HTTP.

Names are imported lazily so that `omni-batch serve`'s registration (which reads
`producer.http.config`) loads without FastAPI, and says what to install when it is missing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {"create_app": "producer.http.app", "ApiConfig": "producer.http.config"}

__all__ = ["ApiConfig", "create_app"]

if TYPE_CHECKING:
    from producer.http.app import create_app
    from producer.http.config import ApiConfig


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'producer.http' has no attribute {name!r}")
