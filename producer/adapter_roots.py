"""The adapter name rule: what a job's `adapter` may be, and where it resolves under adapter roots.

One rule for everyone who reads a name. The job schema checks its form (`adapter_name_problem`); the
worker resolves it by trying each of its roots in turn, the first `<root>/<name>` that is there
winning (`resolve_local` for a directory root; `worker.adapter_cache` for an `s3://bucket/prefix`
root, whose keys are the same names); a producer given the same roots (`--adapter-root`,
`OMNI_ADAPTER_ROOTS`) refuses an unknown adapter before anything is queued
(`unknown_adapter_reason`). A name never resolves outside its root: its form rules out `..`, `.`
and absolute names, and a local root's symlinks are followed before the containment check. Only
local directories can be looked into here: a name is not checked against an object-storage root,
which the worker alone reads.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from producer.errors import AdapterNameError

REMOTE_SCHEMES = ("s3://",)
_ADAPTER_RE = re.compile(r"[A-Za-z0-9._/-]+")


def is_remote(root: str) -> bool:
    """Whether `root` is an object-storage root (`s3://bucket/prefix`) rather than a directory."""
    return root.startswith(REMOTE_SCHEMES)


def adapter_name_problem(name: str) -> str | None:
    """Why `name` cannot name an adapter under a root, or None: a relative `/`-separated path of
    letters, digits, `.`, `_`, `-`, with no empty, `.` or `..` segment."""
    if not _ADAPTER_RE.fullmatch(name):
        return "only letters, digits, '.', '_', '-' and '/' are allowed"
    if name.startswith("/"):
        return "must be relative to the worker's adapter roots (no leading '/')"
    segments = name.split("/")
    if "" in segments:
        return "empty path segment ('//' or a trailing '/')"
    if ".." in segments or "." in segments:
        return "a '.' or '..' segment is not allowed"
    return None


def resolve_local(root: str, name: str) -> str | None:
    """The canonical directory or file `name` names under the directory `root` (canonical itself),
    or None when nothing is there.

    AdapterNameError when the name breaks the rule, or when a symlink leads it outside the root.
    """
    problem = adapter_name_problem(name)
    if problem is not None:
        raise AdapterNameError(problem)
    candidate = os.path.realpath(os.path.join(root, name))
    if not (candidate == root or candidate.startswith(root + os.sep)):
        raise AdapterNameError(f"resolves outside the adapter root {root}")
    return candidate if os.path.isdir(candidate) or os.path.isfile(candidate) else None


def _local(roots: Sequence[str]) -> list[str]:
    return [os.path.realpath(root) for root in roots if not is_remote(root)]


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
        try:
            if resolve_local(root, name) is not None:
                return None
        except AdapterNameError as e:
            return str(e)
    return f"not found under the adapter roots ({', '.join(local)})"
