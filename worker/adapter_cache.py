"""Adapters under `s3://bucket/prefix` roots, fetched into a size-bounded cache on local disk.

The engine reads adapters from local files only, so the worker copies each one into the cache
directory (`OMNI_ADAPTER_CACHE_DIR`, one of the engine's adapter roots) and hands the engine a path
there. For a name `a/b` under `s3://bucket/prefix`:
- the objects directly under `prefix/a/b/` make a directory adapter, of which only
  `adapter_config.json` and the `.safetensors` files are fetched; else the object `prefix/a/b`,
  when it is a `.safetensors` file, is a weights file named directly. Pickle weights are never fetched.
- an entry's name is the sha256 of the bucket and each file's key, size and ETag, so a changed
  object is a new entry (a new path: a new adapter to the engine), never a stale copy.

Each resolve lists the adapter (one LIST request; a weights file named directly takes two) to see
its current ETags; an entry already on disk costs nothing more.

Verified for each file: its size against the listing; its version, by sending the listed ETag as
If-Match (an object replaced meanwhile is refused, not mixed in); its content against the ETag when
that is an MD5 (a single-part upload, not KMS-encrypted), and against any full-object checksum the
object has (CRC32, CRC32C, CRC64NVME, SHA-1, SHA-256: botocore checks it as it reads). A multipart
ETag is not an MD5 of the content, so such a file without a checksum is verified by size only.

Worker processes on one host may share the cache directory:
- an entry is written into `<digest>.partial/` and renamed into place whole, under an exclusive
  `fcntl.flock` on `<digest>.lock`: one process downloads, the others wait and then find it
  complete. A process killed mid-download leaves a partial that is removed when next seen;
- each process holds a shared flock on the entries it handed out last (`in_use`: its window's
  jobs and its engine's held adapters), and eviction skips every entry so held;
- before each download, the least recently used entries (directory mtime, touched at each use)
  are removed until the new one fits in `max_bytes`. Entries in use are kept even past the bound.
One cache object is used from one thread; only file names the cache itself makes are ever removed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import botocore.exceptions as boto_errors

from omni_engine.errors import AdapterNotFoundError, InvalidAdapterError
from omni_engine.lora.files import CONFIG_FILE, PICKLE_SUFFIXES, WEIGHT_SUFFIX
from producer.output_uri import S3Location
from producer.settings import ENV_ADAPTER_CACHE_BYTES
from producer.storage import s3_client, s3_code, s3_error
from worker.errors import AdapterDownloadError

_CHUNK_BYTES = 1024**2
_LOCK = ".lock"
_PARTIAL = ".partial"
_ENTRY_NAME = re.compile(r"[0-9a-f]{64}")
_MD5_ETAG = re.compile(r"[0-9a-f]{32}")
# The server-side encryptions under which a single-part ETag is the MD5 of the content.
_MD5_ENCRYPTIONS = (None, "AES256")
_AGAIN = "; nothing was kept, the next job fetches it again"


@dataclass(frozen=True)
class RemoteFile:
    """One object of an adapter, as listed."""

    key: str
    size: int
    etag: str  # without the quotes S3 puts around it

    @property
    def name(self) -> str:
        return self.key.rpartition("/")[2]


@dataclass(frozen=True)
class RemoteAdapter:
    """An adapter under an s3:// root as listed now: the files to fetch, at the versions seen."""

    bucket: str
    key: str  # the directory's key (without its trailing '/') or the weights file's
    files: tuple[RemoteFile, ...]
    directory: bool

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def digest(self) -> str:
        """The cache entry's name: another key, size or ETag of any file gives another entry."""
        files = sorted((f.key, f.size, f.etag) for f in self.files)
        return hashlib.sha256(json.dumps([self.bucket, self.key, self.directory, files]).encode()).hexdigest()


class AdapterCache:
    """Finds adapters under s3:// roots and fetches them into `directory`, within `max_bytes`."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_bytes: int,
        in_use: int,
        endpoint_url: str | None = None,
    ) -> None:
        self.directory = Path(directory).expanduser().absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._in_use = in_use
        self._held: OrderedDict[str, int] = OrderedDict()  # digest -> its directory's fd, shared-locked
        self._client = s3_client(endpoint_url)

    def find(self, root: S3Location, name: str) -> RemoteAdapter | None:
        """The adapter `name` (already checked against the name rule) under `root` as it is now, or
        None when nothing is there. StorageError when the root cannot be listed."""
        key = f"{root.prefix}/{name}" if root.prefix else name
        uri = f"s3://{root.bucket}/{key}"
        listed, folders = self._list_directory(root.bucket, key + "/")
        if listed or folders:
            files = [f for f in listed if f.name == CONFIG_FILE or f.name.endswith(WEIGHT_SUFFIX)]
            if not any(f.name.endswith(WEIGHT_SUFFIX) for f in files):
                pickles = [f.name for f in listed if f.name.endswith(PICKLE_SUFFIXES)]
                seen = f"only pickle weights, never fetched: {', '.join(pickles)}" if pickles else "none"
                raise InvalidAdapterError(
                    name,
                    f"no {WEIGHT_SUFFIX} file directly under {uri}/ ({seen}); "
                    "weights are read from safetensors only",
                )
            return RemoteAdapter(root.bucket, key, tuple(files), directory=True)
        single = self._object(root.bucket, key)
        if single is None:
            return None
        if not key.endswith(WEIGHT_SUFFIX):
            raise InvalidAdapterError(
                name, f"{uri} is not a {WEIGHT_SUFFIX} file (weights are read from safetensors only)"
            )
        return RemoteAdapter(root.bucket, key, (single,), directory=False)

    def fetch(self, remote: RemoteAdapter, *, adapter: str) -> Path:
        """The local copy of `remote` (its directory, or its weights file), downloaded unless cached.

        AdapterDownloadError when it cannot be fetched whole (nothing is kept), AdapterNotFoundError
        when it was deleted meanwhile, StorageUnavailableError when the storage cannot be reached.
        """
        digest = remote.digest
        entry = self.directory / digest
        with _locked(self._lock_path(digest)):
            if not entry.is_dir():
                self._release(digest)  # a copy deleted by hand: the new one is held afresh
                if remote.size > self.max_bytes:
                    raise AdapterDownloadError(
                        adapter,
                        f"{remote.uri} is {remote.size} bytes, more than the whole adapter cache holds "
                        f"({self.max_bytes} bytes, ${ENV_ADAPTER_CACHE_BYTES})",
                    )
                self._trim(self._in_use - 1)  # this one is about to be in use: the oldest no longer
                self._evict(room_for=remote.size)
                self._download(remote, entry, adapter=adapter)
            self._hold(digest, entry)
            now = time.time_ns()  # not os.utime's default: the kernel's coarse clock would tie uses
            os.utime(entry, ns=(now, now))
        return entry if remote.directory else entry / remote.files[0].name

    # -- listing -----------------------------------------------------------------------------

    def _list_directory(self, bucket: str, prefix: str) -> tuple[list[RemoteFile], bool]:
        """The objects directly under `prefix`, and whether it has deeper "folders" too."""
        files, folders = [], False
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix, Delimiter="/"
        )
        try:
            for page in pages:
                files += [_remote_file(obj) for obj in page.get("Contents", ())]
                folders = folders or bool(page.get("CommonPrefixes"))
        except (boto_errors.BotoCoreError, boto_errors.ClientError) as e:
            raise s3_error("list", f"s3://{bucket}/{prefix}", e) from e
        return files, folders

    def _object(self, bucket: str, key: str) -> RemoteFile | None:
        """The object at `key`, asked as a one-key listing: a key sorts before every key it prefixes,
        and a missing bucket fails instead of reading as a missing object (as a HEAD's bare 404 would)."""
        try:
            response = self._client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
        except (boto_errors.BotoCoreError, boto_errors.ClientError) as e:
            raise s3_error("list", f"s3://{bucket}/{key}", e) from e
        return next((_remote_file(o) for o in response.get("Contents", ()) if o["Key"] == key), None)

    # -- downloading -------------------------------------------------------------------------

    def _download(self, remote: RemoteAdapter, entry: Path, *, adapter: str) -> None:
        """Every file into `<entry>.partial`, checked, then renamed to `entry` whole."""
        partial = entry.with_name(entry.name + _PARTIAL)
        try:
            shutil.rmtree(partial, ignore_errors=True)  # left by a process killed mid-download
            partial.mkdir()
            try:
                for file in remote.files:
                    self._download_file(remote.bucket, file, partial / file.name, adapter=adapter)
                os.rename(partial, entry)
            except BaseException:
                shutil.rmtree(partial, ignore_errors=True)
                raise
        except OSError as e:
            raise AdapterDownloadError(
                adapter,
                f"cannot write {remote.uri} into the adapter cache {self.directory}: {e.strerror or e}",
            ) from e

    def _download_file(self, bucket: str, file: RemoteFile, path: Path, *, adapter: str) -> None:
        uri = f"s3://{bucket}/{file.key}"
        try:
            response = self._client.get_object(Bucket=bucket, Key=file.key, IfMatch=f'"{file.etag}"')
        except boto_errors.ClientError as e:
            if s3_code(e) == "NoSuchKey":
                raise AdapterNotFoundError(adapter, f"{uri} was deleted while it was being fetched") from e
            if s3_code(e) == "PreconditionFailed":
                raise AdapterDownloadError(
                    adapter, f"{uri} changed while it was being fetched; the next job fetches the new version"
                ) from e
            raise s3_error("read", uri, e) from e
        except boto_errors.BotoCoreError as e:
            raise s3_error("read", uri, e) from e
        md5 = hashlib.md5(usedforsecurity=False)
        received = 0
        try:
            with open(path, "xb") as out:
                for chunk in response["Body"].iter_chunks(_CHUNK_BYTES):
                    out.write(chunk)
                    md5.update(chunk)
                    received += len(chunk)
                out.flush()
                os.fsync(out.fileno())
        except boto_errors.FlexibleChecksumError as e:
            raise AdapterDownloadError(
                adapter, f"the bytes of {uri} do not match its checksum ({e}){_AGAIN}"
            ) from e
        except boto_errors.BotoCoreError as e:
            raise AdapterDownloadError(
                adapter,
                f"the download of {uri} broke off after {received} of {file.size} bytes ({e}){_AGAIN}",
            ) from e
        if received != file.size:
            raise AdapterDownloadError(
                adapter, f"received {received} bytes of {uri}, listed at {file.size}{_AGAIN}"
            )
        encryption = response.get("ServerSideEncryption")
        if _MD5_ETAG.fullmatch(file.etag) and encryption in _MD5_ENCRYPTIONS and md5.hexdigest() != file.etag:
            raise AdapterDownloadError(adapter, f"the bytes of {uri} do not match its ETag (an MD5){_AGAIN}")

    # -- sharing and eviction ----------------------------------------------------------------

    def _lock_path(self, digest: str) -> Path:
        return self.directory / (digest + _LOCK)

    def _hold(self, digest: str, entry: Path) -> None:
        """Mark the entry in use by this process: a shared flock on its directory, kept for the
        `in_use` entries handed out last. Never blocks: an evictor takes its exclusive flock only
        under the entry's lock, which the caller holds."""
        if digest in self._held:
            self._held.move_to_end(digest)
            return
        fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_SH)
        self._held[digest] = fd
        self._trim(self._in_use)

    def _trim(self, keep: int) -> None:
        """Hold only the `keep` entries handed out last."""
        while len(self._held) > max(keep, 0):
            os.close(self._held.popitem(last=False)[1])

    def _release(self, digest: str) -> None:
        fd = self._held.pop(digest, None)
        if fd is not None:
            os.close(fd)

    def _evict(self, *, room_for: int) -> None:
        """Remove partial downloads nobody is writing, then the least recently used entries nobody
        holds, until `room_for` more bytes fit."""
        entries = []
        for item in os.scandir(self.directory):
            name = item.name.removesuffix(_PARTIAL)
            if not _ENTRY_NAME.fullmatch(name) or not item.is_dir(follow_symlinks=False):
                continue
            if item.name.endswith(_PARTIAL):
                self._remove(name, Path(item.path))
            else:
                entries.append((item.stat().st_mtime_ns, name, _entry_bytes(item.path)))
        total = sum(size for *_, size in entries)
        for _, digest, size in sorted(entries):
            if total + room_for <= self.max_bytes:
                return
            if self._remove(digest, self.directory / digest):
                total -= size

    def _remove(self, digest: str, path: Path) -> bool:
        """Delete an entry, or a partial download, unless a process is writing or holding it."""
        lock_path = self._lock_path(digest)
        lock = _try_lock(lock_path)
        if lock is None:
            return False  # being downloaded, or handed out right now
        try:
            if path.name == digest:
                if not _unheld(path):
                    return False
                partial = path.with_name(digest + _PARTIAL)
                shutil.rmtree(partial, ignore_errors=True)
                os.rename(path, partial)  # no half-deleted entry can ever look complete
                path = partial
            shutil.rmtree(path, ignore_errors=True)
            lock_path.unlink(missing_ok=True)
            return True
        finally:
            os.close(lock)


def _remote_file(obj: dict) -> RemoteFile:
    return RemoteFile(obj["Key"], obj["Size"], obj["ETag"].strip('"'))


def _entry_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in os.scandir(path) if f.is_file(follow_symlinks=False))


def _unheld(entry: Path) -> bool:
    """Whether no process holds the entry (takes, and drops at once, its directory's exclusive flock)."""
    try:
        fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _open_locked(path: Path, operation: int) -> int | None:
    """An fd holding `path`'s flock, or None when LOCK_NB was asked and another holds it.

    The holder that evicts an entry unlinks its lock file: a lock won on an unlinked file is
    dropped and taken again on the file now at `path`.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, operation)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _try_lock(path: Path) -> int | None:
    return _open_locked(path, fcntl.LOCK_EX | fcntl.LOCK_NB)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = _open_locked(path, fcntl.LOCK_EX)
    try:
        yield
    finally:
        os.close(fd)
