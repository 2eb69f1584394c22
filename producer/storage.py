"""Where outputs are written and read: a small Protocol with a local and an S3 implementation.

The worker, the embedded runner and `omni-batch status` all go through `open_storage`, so they
agree on keys, atomicity and errors. Keys are relative, `/`-separated paths under the storage root
(see `producer.layout`; `producer.output_uri` parses the root); no key can reach outside that root.

Errors: `StorageUnavailableError` for what may pass (unreachable endpoint, timeouts, 5xx,
throttling), plain `StorageError` for what will not (no such bucket, access denied, bad key).
Credentials come from wherever boto3 finds them; they are never accepted in a URI, so no URI in a
message can carry one.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import boto3
import botocore.exceptions as boto_errors
from botocore.config import Config

from producer.errors import (
    InvalidStorageKeyError,
    InvalidStorageURIError,
    StorageError,
    StorageUnavailableError,
)
from producer.layout import key_problem
from producer.output_uri import S3Location, check_bucket, check_prefix, parse_output_uri
from producer.settings import ENV_S3_ENDPOINT_URL, read_environment

DEFAULT_CONTENT_TYPE = "application/octet-stream"

# A local write goes to `.<name>.<random><TMP_SUFFIX>` first; listings never show these.
TMP_SUFFIX = ".omni-tmp"

# OSError numbers that network filesystems raise for conditions that pass.
_TRANSIENT_ERRNOS = frozenset({errno.ETIMEDOUT, errno.EAGAIN, errno.ESTALE})

# S3 error codes that mean "try again later" whatever their HTTP status.
_TRANSIENT_S3_CODES = frozenset(
    {
        "InternalError",
        "RequestLimitExceeded",
        "RequestThrottled",
        "RequestTimeout",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
    }
)


class Storage(Protocol):
    """What the worker writes outputs through and `status` reads them through."""

    @property
    def uri(self) -> str:
        """The root, as a user would pass it (`s3://bucket/prefix` or a directory); never a secret."""
        ...

    def put_bytes(self, key: str, data: bytes, *, content_type: str = DEFAULT_CONTENT_TYPE) -> None:
        """Write `data` at `key` whole: a reader sees the old object, or none, or all of the new one."""
        ...

    def get_bytes(self, key: str) -> bytes | None:
        """The object at `key`, or None when there is none."""
        ...

    def exists(self, key: str) -> bool:
        """Whether an object is at `key` (for a sidecar: whether the job is done)."""
        ...

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        """Every key that starts with `prefix` (a plain string prefix), in no particular order."""
        ...


def _check_key(uri: str, key: str) -> str:
    problem = key_problem(key)
    if problem is not None:
        raise InvalidStorageKeyError(f"{uri}: key {key!r} is {problem}")
    return key


def _check_prefix(uri: str, prefix: str) -> str:
    if prefix:
        _check_key(uri, prefix.removesuffix("/"))
    return prefix


class LocalStorage:
    """Outputs in a local directory. Writes are atomic (temp file, fsync, os.replace)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()
        self._real_root = self.root.resolve()

    @property
    def uri(self) -> str:
        return str(self.root)

    def _path(self, key: str) -> Path:
        _check_key(self.uri, key)
        if key.endswith(TMP_SUFFIX):
            raise InvalidStorageKeyError(
                f"{self.uri}: key {key!r} ends with {TMP_SUFFIX!r}, kept for temp files"
            )
        path = self.root / key
        # A symlink inside the root must not lead a key outside it.
        if not path.resolve().is_relative_to(self._real_root):
            raise InvalidStorageKeyError(f"{self.uri}: key {key!r} resolves outside the storage root")
        return path

    def _error(self, action: str, key: str, e: OSError) -> StorageError:
        cls = StorageUnavailableError if e.errno in _TRANSIENT_ERRNOS else StorageError
        return cls(f"cannot {action} {self.uri}/{key}: {e.strerror or e}")

    def put_bytes(self, key: str, data: bytes, *, content_type: str = DEFAULT_CONTENT_TYPE) -> None:
        """Write atomically; `content_type` only matters to object stores."""
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}{TMP_SUFFIX}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # os.open with 0o666 lets the umask decide the mode, as for any other file the user writes.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        except OSError as e:
            raise self._error("write", key, e) from e

    def get_bytes(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        except OSError as e:
            raise self._error("read", key, e) from e

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        return self._walk(_check_prefix(self.uri, prefix))

    def _walk(self, prefix: str) -> Iterator[str]:
        def raise_unless_missing(e: OSError) -> None:
            if not isinstance(e, FileNotFoundError | NotADirectoryError):
                raise e

        # Only the directory part of the prefix needs walking; the rest is a string filter.
        top = self.root / prefix.rpartition("/")[0]
        try:
            for dirpath, _, filenames in os.walk(top, onerror=raise_unless_missing):
                for name in filenames:
                    if name.endswith(TMP_SUFFIX):
                        continue
                    key = (Path(dirpath) / name).relative_to(self.root).as_posix()
                    if key.startswith(prefix):
                        yield key
        except OSError as e:
            raise self._error("list", prefix, e) from e


@dataclass(frozen=True)
class S3Settings:
    """How hard one call tries before it gives up. Short on purpose: the worker retries the job."""

    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    max_attempts: int = 3


def _check_endpoint(endpoint_url: str) -> str:
    # The URL is not echoed: it could hold credentials, which is exactly what is being refused.
    split = urlsplit(endpoint_url)
    if split.username is not None or split.password is not None:
        raise InvalidStorageURIError(
            f"the S3 endpoint URL ({ENV_S3_ENDPOINT_URL}) must not carry credentials: "
            "give them the way boto3 reads them (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile)"
        )
    if split.scheme not in ("http", "https") or not split.hostname:
        raise InvalidStorageURIError(
            f"the S3 endpoint URL ({ENV_S3_ENDPOINT_URL}) must look like http(s)://host[:port]"
        )
    return endpoint_url


def _is_transient(e: Exception) -> bool:
    if isinstance(e, boto_errors.ClientError):
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = e.response.get("Error", {}).get("Code", "")
        return status >= 500 or status == 429 or code in _TRANSIENT_S3_CODES
    if isinstance(e, boto_errors.SSLError):  # a bad certificate stays bad
        return False
    return isinstance(
        e, boto_errors.ConnectionError | boto_errors.HTTPClientError | boto_errors.IncompleteReadError
    )


def s3_code(e: boto_errors.ClientError) -> str:
    """The S3 error code of a failed call (`NoSuchKey`, `PreconditionFailed`, ...)."""
    return e.response.get("Error", {}).get("Code", "")


def s3_error(action: str, target: str, e: Exception) -> StorageError:
    """A failed S3 call as the storage error it is: StorageUnavailableError when it may pass.

    `target` is what a user would recognise (`s3://bucket/key`); the message never holds a credential.
    """
    cls = StorageUnavailableError if _is_transient(e) else StorageError
    if isinstance(e, boto_errors.ClientError):
        message = e.response.get("Error", {}).get("Message", "")
        reason = f"{s3_code(e) or 'error'}: {message}".removesuffix(": ")
    else:
        reason = str(e)
    return cls(f"cannot {action} {target}: {reason}")


def s3_client(endpoint_url: str | None = None, settings: S3Settings | None = None) -> Any:
    """A boto3 S3 client for AWS or any S3-compatible server (path-style addressing), with short
    timeouts and few retries (`S3Settings`): the worker retries the job, not the call.

    `endpoint_url` defaults to $OMNI_S3_ENDPOINT_URL, else AWS. Every S3 call omni-batch makes goes
    through a client from here.
    """
    settings = settings or S3Settings()
    endpoint_url = endpoint_url or read_environment().s3_endpoint_url
    config = Config(
        s3={"addressing_style": "path"},
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        retries={"mode": "standard", "total_max_attempts": settings.max_attempts},
    )
    # A session of its own: boto3's default session is not thread-safe, a client is.
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url and _check_endpoint(endpoint_url), config=config
    )


class S3Storage:
    """Outputs under `s3://bucket/prefix` on AWS or any S3-compatible server (path-style addressing)."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        settings: S3Settings | None = None,
    ) -> None:
        self.bucket = check_bucket(bucket)
        prefix = check_prefix(prefix)
        self._prefix = f"{prefix}/" if prefix else ""
        self._client = s3_client(endpoint_url, settings)

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self._prefix.removesuffix('/')}".removesuffix("/")

    def _key(self, key: str) -> str:
        return self._prefix + _check_key(self.uri, key)

    def _error(self, action: str, key: str, e: Exception) -> StorageError:
        return s3_error(action, f"{self.uri}/{key}" if key else self.uri, e)

    def put_bytes(self, key: str, data: bytes, *, content_type: str = DEFAULT_CONTENT_TYPE) -> None:
        """One PUT: S3 makes an object visible only once it is complete."""
        full_key = self._key(key)
        try:
            self._client.put_object(Bucket=self.bucket, Key=full_key, Body=data, ContentType=content_type)
        except (boto_errors.BotoCoreError, boto_errors.ClientError) as e:
            raise self._error("write", key, e) from e

    def get_bytes(self, key: str) -> bytes | None:
        full_key = self._key(key)
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=full_key)
            return response["Body"].read()
        except boto_errors.ClientError as e:
            if s3_code(e) == "NoSuchKey":
                return None
            raise self._error("read", key, e) from e
        except boto_errors.BotoCoreError as e:
            raise self._error("read", key, e) from e

    def exists(self, key: str) -> bool:
        """Asked as a one-key listing rather than a HEAD: a HEAD answers a bare 404 for a missing
        bucket too, which would read as "not written yet" instead of failing."""
        full_key = self._key(key)
        try:
            response = self._client.list_objects_v2(Bucket=self.bucket, Prefix=full_key, MaxKeys=1)
        except (boto_errors.BotoCoreError, boto_errors.ClientError) as e:
            raise self._error("check", key, e) from e
        # A key sorts before every longer key it prefixes, so if it exists it comes first.
        return any(obj["Key"] == full_key for obj in response.get("Contents", ()))

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        return self._list(_check_prefix(self.uri, prefix))

    def presigned_url(self, key: str, *, expires_s: int) -> str:
        """A URL that reads the object at `key` for `expires_s` seconds, with no other credential.

        Signed locally (no request is made). Like every SigV4 URL it names the access key id,
        never the secret: hand out URLs signed with a read-only key.
        """
        try:
            return self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=expires_s
            )
        except (boto_errors.BotoCoreError, boto_errors.ClientError) as e:
            raise self._error("sign a URL for", key, e) from e

    def _list(self, prefix: str) -> Iterator[str]:
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._prefix + prefix
        )
        try:
            for page in pages:
                for obj in page.get("Contents", ()):
                    yield obj["Key"].removeprefix(self._prefix)
        except (boto_errors.BotoCoreError, boto_errors.ClientError) as e:
            raise self._error("list", prefix, e) from e


def open_storage(uri: str, *, endpoint_url: str | None = None) -> Storage:
    """Open `s3://bucket/prefix`, `file:///dir` or a plain directory path.

    `endpoint_url` (else $OMNI_S3_ENDPOINT_URL, else AWS) only matters for s3:// URIs.
    """
    location = parse_output_uri(uri)
    if isinstance(location, S3Location):
        return S3Storage(location.bucket, location.prefix, endpoint_url=endpoint_url)
    return LocalStorage(location.path)
