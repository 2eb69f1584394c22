"""Whether an adapter name resolves under adapter roots, checked where jobs are made, not where they run.

The worker resolves a job's adapter by trying each of its roots in turn: the first directory
`<root>/<name>` wins, and a name may never resolve outside its root. A producer given the same roots
(`--adapter-root`, `OMNI_ADAPTER_ROOTS`) applies the same rule to refuse an unknown adapter before
anything is queued. Only local directories can be looked into here: a name is not checked against
an object-storage root (`s3://...`), which the worker alone reads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

_REMOTE_SCHEMES = ("s3://",)


def _local(roots: Sequence[str]) -> list[str]:
    return [os.path.realpath(root) for root in roots if not root.startswith(_REMOTE_SCHEMES)]


def root_problems(roots: Sequence[str]) -> list[str]:
    """Why each local root cannot be used to check names (it is not a directory)."""
    return [f"adapter root {root}: not a directory" for root in _local(roots) if not os.path.isdir(root)]


def unknown_adapter_reason(name: str, roots: Sequence[str]) -> str | None:
    """Why `name` would not resolve under `roots`, or None when it does or cannot be checked here.

    With no roots at all nothing can be checked: whether the adapter exists is the worker's call.
    """
    local = _local(roots)
    if not local or len(local) < len(roots):
        return None  # no roots, or it may live under a remote root, which only the worker reads
    for root in local:
        candidate = os.path.realpath(os.path.join(root, name))
        if not (candidate == root or candidate.startswith(root + os.sep)):
            return f"resolves outside the adapter root {root}"
        if os.path.isdir(candidate):
            return None
    return f"not found under the adapter roots ({', '.join(local)})"
