"""The key layout: where a job's outputs live under an output root, and what may name them.

`<dataset>/<job_id>.png` is the image, `<dataset>/<job_id>.json` the sidecar (written last: its
presence means the job is done) and `<dataset>/<job_id>.error.json` the record of a job that failed
for good. The worker writes these keys and `status` reads them, so both go through this module.
A dataset name and a job id become path components, so the rule for names lives here too, and
the job schema checks its `dataset` and `job_id` with it.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import NamedTuple

from producer.defaults import MAX_NAME_LENGTH
from producer.errors import InvalidStorageKeyError

IMAGE_SUFFIX = ".png"
SIDECAR_SUFFIX = ".json"
ERROR_SUFFIX = ".error.json"

IMAGE_CONTENT_TYPE = "image/png"
JSON_CONTENT_TYPE = "application/json"

_NAME_CHARS = re.compile(r"[A-Za-z0-9._-]+")


class OutputKind(StrEnum):
    IMAGE = "image"
    SIDECAR = "sidecar"
    ERROR = "error"


class OutputRef(NamedTuple):
    """What a listed key is: whose output, and which one."""

    dataset: str
    job_id: str
    kind: OutputKind


def name_problem(value: str) -> str | None:
    """Why `value` cannot name a dataset or a job, or None if it can."""
    if not 1 <= len(value) <= MAX_NAME_LENGTH:
        return f"must be 1..{MAX_NAME_LENGTH} characters"
    if not _NAME_CHARS.fullmatch(value):
        return "only letters, digits, '.', '_' and '-' are allowed"
    if value in (".", ".."):
        return "'.' and '..' are not allowed (the name becomes a path component)"
    return None


def key_problem(key: str) -> str | None:
    """Why `key` is not a plain relative path under a root (nor an S3 prefix), or None if it is."""
    if "\\" in key or "\x00" in key or any(part in ("", ".", "..") for part in key.split("/")):
        return (
            "not a relative path inside the storage root "
            "(no absolute path, no '.', '..' or empty segment, no backslash)"
        )
    return None


def _is_name(value: str) -> bool:
    return name_problem(value) is None


def _check_name(field: str, value: str) -> str:
    problem = name_problem(value)
    if problem is not None:
        raise InvalidStorageKeyError(f"{field} {value!r} cannot name an output: {problem}")
    return value


def dataset_prefix(dataset: str) -> str:
    """The prefix to list for every output of a dataset."""
    return f"{_check_name('dataset', dataset)}/"


def _key(dataset: str, job_id: str, suffix: str) -> str:
    return f"{dataset_prefix(dataset)}{_check_name('job_id', job_id)}{suffix}"


def image_key(dataset: str, job_id: str) -> str:
    return _key(dataset, job_id, IMAGE_SUFFIX)


def sidecar_key(dataset: str, job_id: str) -> str:
    return _key(dataset, job_id, SIDECAR_SUFFIX)


def error_key(dataset: str, job_id: str) -> str:
    return _key(dataset, job_id, ERROR_SUFFIX)


def classify_key(key: str) -> OutputRef | None:
    """Map a key relative to the output root back to its job; None for anything not in the layout."""
    dataset, sep, name = key.partition("/")
    if not sep or not _is_name(dataset):
        return None
    # ERROR_SUFFIX ends with SIDECAR_SUFFIX, so it is tried first.
    for suffix, kind in (
        (ERROR_SUFFIX, OutputKind.ERROR),
        (SIDECAR_SUFFIX, OutputKind.SIDECAR),
        (IMAGE_SUFFIX, OutputKind.IMAGE),
    ):
        if name.endswith(suffix):
            job_id = name.removesuffix(suffix)
            return OutputRef(dataset, job_id, kind) if _is_name(job_id) else None
    return None
