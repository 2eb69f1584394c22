"""The output URI: `s3://bucket/prefix`, `file:///dir` or a plain directory, parsed in one place.

The job schema checks a job's `output` with `parse_output_uri`, and `producer.storage` opens what
it returns, so a URI a job may carry is exactly a URI the worker can open: one bucket rule, one
prefix rule. Nothing of a URI is echoed in a message until it is known to hold no credential.
"""

from __future__ import annotations

import re
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

from producer.errors import InvalidStorageURIError
from producer.layout import key_problem
from producer.redact import redact

_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
# AWS's rule for new buckets, which S3-compatible servers accept too.
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IPV4_RE = re.compile(r"\d+\.\d+\.\d+\.\d+")
_NO_CREDENTIALS = (
    "an output URI must not carry credentials: give them the way boto3 reads them "
    "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile)"
)


class S3Location(NamedTuple):
    """`s3://bucket/prefix`; `prefix` has no leading or trailing '/' and may be empty."""

    bucket: str
    prefix: str


class LocalLocation(NamedTuple):
    """A directory on the machine that writes or reads the outputs."""

    path: str


def check_bucket(bucket: str) -> str:
    """`bucket` if it is a valid S3 bucket name, else InvalidStorageURIError saying the rule."""
    if (
        not _BUCKET_RE.fullmatch(bucket)
        or ".." in bucket
        or _IPV4_RE.fullmatch(bucket)
        or bucket.startswith(("xn--", "sthree-"))
        or bucket.endswith(("-s3alias", "--ol-s3"))
    ):
        raise InvalidStorageURIError(
            f"bucket {bucket!r} is not a valid S3 bucket name (3..63 of a-z 0-9 . -, "
            "starting and ending with a letter or digit)"
        )
    return bucket


def check_prefix(prefix: str) -> str:
    """`prefix` without its outer '/', if it is a plain relative path, else InvalidStorageURIError."""
    prefix = prefix.strip("/")
    problem = key_problem(prefix) if prefix else None
    if problem is not None:
        raise InvalidStorageURIError(f"S3 prefix {prefix!r} is not usable: {problem}")
    return prefix


def _parse_s3(uri: str) -> S3Location:
    split = urlsplit(uri)
    if "@" in split.netloc:
        raise InvalidStorageURIError(_NO_CREDENTIALS)
    if split.query or split.fragment or "?" in uri or "#" in uri:
        raise InvalidStorageURIError("an S3 URI takes no query or fragment: use s3://bucket/prefix")
    if not split.netloc:
        raise InvalidStorageURIError(f"output URI {uri!r} names no bucket: use s3://bucket/prefix")
    return S3Location(check_bucket(split.netloc), check_prefix(split.path))


def _parse_file(uri: str) -> LocalLocation:
    split = urlsplit(uri)
    if split.netloc not in ("", "localhost") or split.query or split.fragment or not split.path:
        raise InvalidStorageURIError(
            f"output URI {redact(uri)!r} is not a local file URI: use file:///abs/dir"
        )
    return LocalLocation(unquote(split.path))


def parse_output_uri(uri: str) -> S3Location | LocalLocation:
    """Where `uri` points, or InvalidStorageURIError (a ValueError) naming what is wrong with it."""
    if not uri:
        raise InvalidStorageURIError("the output URI is empty: use s3://bucket/prefix or a directory")
    if _CONTROL_RE.search(uri):
        raise InvalidStorageURIError("control characters are not allowed in an output URI")
    scheme = _SCHEME_RE.match(uri)
    if scheme is None:
        if uri.lower().startswith("s3:"):
            raise InvalidStorageURIError("looks like a malformed S3 URI: use s3://bucket/prefix")
        return LocalLocation(uri)
    name = scheme.group(1).lower()
    if name == "s3":
        return _parse_s3(uri)
    if name == "file":
        return _parse_file(uri)
    raise InvalidStorageURIError(
        f"unsupported output URI scheme {name!r}: use s3://bucket/prefix or a local directory"
    )
