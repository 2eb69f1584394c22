"""Where a worker may write: its own output, and the roots its operator allows (`OMNI_OUTPUT_ROOTS`).

A job's `output` names any directory or bucket, so without a bound a job could write wherever the
worker's rights reach. Local paths are compared after resolving `..` and symlinks, component by
component (`/data/out` does not contain `/data/out2`); S3 locations by bucket and whole prefix
segments (`s3://b/out` does not contain `s3://b/out2`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from producer.errors import OutputNotAllowedError
from producer.output_uri import LocalLocation, S3Location, parse_output_uri
from producer.redact import redact
from producer.settings import ENV_OUTPUT_ROOTS


def _canonical(location: S3Location | LocalLocation) -> S3Location | LocalLocation:
    if isinstance(location, LocalLocation):
        return LocalLocation(os.path.realpath(location.path))
    return location


def _contains(root: S3Location | LocalLocation, place: S3Location | LocalLocation) -> bool:
    if isinstance(root, LocalLocation) and isinstance(place, LocalLocation):
        return os.path.commonpath([root.path, place.path]) == root.path
    if isinstance(root, S3Location) and isinstance(place, S3Location):
        return root.bucket == place.bucket and (
            not root.prefix or place.prefix == root.prefix or place.prefix.startswith(root.prefix + "/")
        )
    return False


class OutputRoots:
    """The places a worker may write under; `check` refuses any other output."""

    def __init__(self, roots: Iterable[str]) -> None:
        self.roots = tuple(roots)
        self._parsed = [_canonical(parse_output_uri(root)) for root in self.roots]

    def allows(self, uri: str) -> bool:
        """Whether `uri` lies under one of the roots (a malformed URI never does)."""
        place = _canonical(parse_output_uri(uri))
        return any(_contains(root, place) for root in self._parsed)

    def check(self, uri: str) -> None:
        """OutputNotAllowedError, naming the output and the allowed roots, unless `uri` is allowed."""
        if not self.allows(uri):
            allowed = ", ".join(redact(root) for root in self.roots) or "none"
            raise OutputNotAllowedError(
                f"output {redact(uri)!r} is outside this worker's allowed output roots ({allowed}); "
                f"the operator allows more with ${ENV_OUTPUT_ROOTS}"
            )
