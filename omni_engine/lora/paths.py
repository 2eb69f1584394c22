"""Where an adapter may be read from: every path is resolved (`..`, symlinks) and checked against roots."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from omni_engine.errors import AdapterAccessError, AdapterNotFoundError, InvalidAdapterError


def canonical_roots(roots: Sequence[str | os.PathLike] | None) -> tuple[Path, ...] | None:
    if roots is None:
        return None
    return tuple(Path(os.path.realpath(root)) for root in roots)


def _check_inside(path: Path, roots: tuple[Path, ...] | None, *, adapter: str, shown: str) -> None:
    if roots is None:
        return
    if not any(path == root or path.is_relative_to(root) for root in roots):
        raise AdapterAccessError(adapter, f"{shown} resolves outside the allowed adapter roots")


def resolve_adapter_path(path: str | os.PathLike, roots: tuple[Path, ...] | None, *, adapter: str) -> Path:
    """The adapter's canonical directory, or weights file when given one. Access is checked before
    existence, so nothing leaks."""
    resolved = Path(os.path.realpath(os.path.expanduser(path)))
    _check_inside(resolved, roots, adapter=adapter, shown=f"path {os.fspath(path)!r}")
    if not resolved.exists():
        raise AdapterNotFoundError(adapter, f"no such directory or file {os.fspath(path)!r}")
    if not (resolved.is_dir() or resolved.is_file()):
        raise AdapterNotFoundError(adapter, f"{os.fspath(path)!r} is neither a directory nor a file")
    return resolved


def read_capped(path: Path, limit: int, *, adapter: str) -> bytes:
    """Read a resolved file, refusing one over `limit` bytes before reading it.

    O_NOFOLLOW: a symlink swapped in after the roots check is refused, not followed.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise AdapterNotFoundError(adapter, f"cannot open {path.name}: {e.strerror}") from e
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise InvalidAdapterError(adapter, f"{path.name} is {size} bytes, above the limit of {limit}")
        return f.read(limit + 1)


def file_sha256(path: Path, *, adapter: str) -> str:
    """The sha256 of a resolved file, streamed (a re-check reads no more memory than a chunk).

    O_NOFOLLOW as in `read_capped`.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise AdapterNotFoundError(adapter, f"cannot open {path.name}: {e.strerror}") from e
    with os.fdopen(fd, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def resolve_file(directory: Path, name: str, roots: tuple[Path, ...] | None, *, adapter: str) -> Path | None:
    """A file inside the adapter directory, or None; a symlink escaping the roots is an error."""
    candidate = directory / name
    if not candidate.exists() and not candidate.is_symlink():
        return None
    resolved = Path(os.path.realpath(candidate))
    _check_inside(resolved, roots, adapter=adapter, shown=f"file {name!r}")
    if not resolved.is_file():
        raise AdapterNotFoundError(adapter, f"{name!r} is not a regular file (dangling link?)")
    return resolved
