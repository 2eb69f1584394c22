"""The storage layer against a real directory and a real S3 server (moto over HTTP).

`output_uri` runs every test that takes it once per backend, so both must behave the same.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fixtures.s3_server import FAKE_ACCESS_KEY_ID, FAKE_SECRET_ACCESS_KEY, S3Bucket, S3Server

from producer.errors import (
    InvalidStorageKeyError,
    InvalidStorageURIError,
    StorageError,
    StorageUnavailableError,
)
from producer.storage import LocalStorage, S3Settings, S3Storage, Storage, open_storage

# ---------------------------------------------------------------- helpers


def _seed(request: pytest.FixtureRequest, uri: str, keys: list[str]) -> None:
    """Create many empty objects fast, without going through the code under test."""
    if uri.startswith("s3://"):
        request.getfixturevalue("s3_bucket").seed(keys)
        return
    for key in keys:
        path = Path(uri, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def _every_operation(storage: Storage, key: str) -> list[Callable[[], object]]:
    return [
        lambda: storage.put_bytes(key, b"x"),
        lambda: storage.get_bytes(key),
        lambda: storage.exists(key),
        lambda: list(storage.list_keys(key)),
    ]


def _assert_no_secret(text: str) -> None:
    assert FAKE_SECRET_ACCESS_KEY not in text
    assert FAKE_ACCESS_KEY_ID not in text


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port bound but never listening: every connection to it is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@dataclass
class FailingS3:
    endpoint_url: str
    requests: list[str] = field(default_factory=list)


@pytest.fixture
def failing_s3(s3_server: S3Server) -> Iterator[Callable[[int, str], FailingS3]]:
    """Start HTTP servers that answer every S3 request with one fixed error and count the requests.
    Credentials come from the `s3_server` environment."""
    servers: list[ThreadingHTTPServer] = []

    def start(status: int, code: str) -> FailingS3:
        body = f"<Error><Code>{code}</Code><Message>injected {code}</Message></Error>".encode()
        failing = FailingS3("")

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                failing.requests.append(f"{self.command} {self.path}")
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_PUT = _answer

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        failing.endpoint_url = f"http://127.0.0.1:{server.server_address[1]}"
        return failing

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------- both backends


def test_bytes_round_trip(output_uri: str) -> None:
    storage = open_storage(output_uri)
    data = bytes(range(256)) * 4096 + os.urandom(4096)
    storage.put_bytes("ds/job.png", data, content_type="image/png")
    assert storage.get_bytes("ds/job.png") == data
    assert storage.exists("ds/job.png")

    storage.put_bytes("ds/job.png", b"replaced")
    assert storage.get_bytes("ds/job.png") == b"replaced"

    storage.put_bytes("ds/empty.json", b"")
    assert storage.get_bytes("ds/empty.json") == b""
    assert storage.exists("ds/empty.json")


def test_missing_keys_read_as_none(output_uri: str) -> None:
    storage = open_storage(output_uri)
    assert storage.get_bytes("ds/nothing.json") is None
    assert not storage.exists("ds/nothing.json")
    assert list(storage.list_keys("ds/")) == []

    storage.put_bytes("ds/sub/abc.json", b"{}")
    # Neither a key's prefix nor its "directory" is an object.
    for key in ("ds/sub/ab", "ds/sub/abc", "ds/sub/abc.json.x", "ds/sub", "ds"):
        assert not storage.exists(key), key
        assert storage.get_bytes(key) is None, key


def test_list_keys_filters_by_string_prefix(output_uri: str) -> None:
    storage = open_storage(output_uri)
    keys = ["a/1.png", "a/1.json", "a/sub/2.json", "ab/3.json", "b/4.json"]
    for key in keys:
        storage.put_bytes(key, b"x")
    assert sorted(storage.list_keys("a/")) == ["a/1.json", "a/1.png", "a/sub/2.json"]
    assert sorted(storage.list_keys("a")) == ["a/1.json", "a/1.png", "a/sub/2.json", "ab/3.json"]
    assert sorted(storage.list_keys("a/1")) == ["a/1.json", "a/1.png"]
    assert sorted(storage.list_keys()) == sorted(keys)
    assert list(storage.list_keys("zzz/")) == []


def test_list_keys_returns_more_than_one_page(output_uri: str, request: pytest.FixtureRequest) -> None:
    keys = [f"ds/{i:05d}.json" for i in range(1500)]  # an S3 listing page holds 1000 keys
    _seed(request, output_uri, [*keys, "other/00000.json"])
    assert sorted(open_storage(output_uri).list_keys("ds/")) == keys


BAD_KEYS = [
    "../escaped.png",
    "ds/../../escaped.png",
    "/escaped.png",
    "",
    "ds//escaped.png",
    "./escaped.png",
    "ds/.",
    "ds/",
    "ds\\..\\..\\escaped.png",
    "ds/\x00escaped.png",
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_keys_cannot_leave_the_root(output_uri: str, key: str, tmp_path: Path) -> None:
    storage = open_storage(output_uri)
    for operation in _every_operation(storage, key)[:3]:
        with pytest.raises(InvalidStorageKeyError, match="not a relative path inside the storage root"):
            operation()
    assert list(storage.list_keys()) == []
    assert not list(tmp_path.rglob("escaped.png"))
    assert not Path("/escaped.png").exists()


@pytest.mark.parametrize("prefix", ["../", "..", "ds/../../", "/etc/", "ds//"])
def test_list_prefixes_cannot_leave_the_root(output_uri: str, prefix: str) -> None:
    with pytest.raises(InvalidStorageKeyError):
        open_storage(output_uri).list_keys(prefix)


# ---------------------------------------------------------------- local directory


def test_local_symlink_cannot_lead_outside_the_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.json").write_bytes(b"{}")
    root = tmp_path / "out"
    root.mkdir()
    (root / "ds").symlink_to(outside)
    storage = LocalStorage(root)
    with pytest.raises(InvalidStorageKeyError, match="resolves outside the storage root"):
        storage.put_bytes("ds/job.png", b"x")
    with pytest.raises(InvalidStorageKeyError, match="resolves outside the storage root"):
        storage.get_bytes("ds/secret.json")
    assert sorted(p.name for p in outside.iterdir()) == ["secret.json"]


def test_local_write_becomes_visible_whole_and_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = LocalStorage(tmp_path / "out")
    storage.put_bytes("ds/job.json", b"old")
    new = b"new" * 100_000
    seen_before_rename = []
    real_replace = os.replace

    def replace_after_looking(src: str, dst: str) -> None:
        # The moment before the new object appears: the data is complete, but only in a temp
        # file no reader looks at.
        seen_before_rename.append(
            (storage.get_bytes("ds/job.json"), sorted(storage.list_keys()), Path(src).read_bytes())
        )
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_after_looking)
    storage.put_bytes("ds/job.json", new)
    assert seen_before_rename == [(b"old", ["ds/job.json"], new)]
    assert storage.get_bytes("ds/job.json") == new
    assert os.listdir(tmp_path / "out" / "ds") == ["job.json"]


def test_local_failed_write_keeps_the_old_object_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = LocalStorage(tmp_path / "out")
    storage.put_bytes("ds/job.json", b"old")

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "injected I/O error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(StorageError, match="injected I/O error") as info:
        storage.put_bytes("ds/job.json", b"new")
    assert not isinstance(info.value, StorageUnavailableError)
    assert f"{tmp_path / 'out'}/ds/job.json" in str(info.value)
    assert storage.get_bytes("ds/job.json") == b"old"
    assert os.listdir(tmp_path / "out" / "ds") == ["job.json"]


def test_local_reader_racing_a_writer_sees_only_whole_objects(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "out")
    versions = [b"a" * 2**20, b"b" * 2**20]
    storage.put_bytes("ds/job.json", versions[0])

    def write() -> None:
        for i in range(40):
            storage.put_bytes("ds/job.json", versions[i % 2])

    writer = threading.Thread(target=write)
    writer.start()
    reads = 0
    while writer.is_alive():
        assert storage.get_bytes("ds/job.json") in versions
        reads += 1
    writer.join()
    assert reads > 0


def test_local_files_get_the_usual_permissions(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        LocalStorage(tmp_path / "out").put_bytes("ds/job.png", b"x")
    finally:
        os.umask(old_umask)
    assert (tmp_path / "out" / "ds" / "job.png").stat().st_mode & 0o777 == 0o644


# ---------------------------------------------------------------- S3


def test_s3_objects_sit_under_the_prefix_with_their_content_type(s3_bucket: S3Bucket) -> None:
    storage = open_storage(s3_bucket.uri)
    storage.put_bytes("ds/job.png", b"png", content_type="image/png")
    head = s3_bucket.client.head_object(Bucket=s3_bucket.bucket, Key="out/ds/job.png")
    assert head["ContentType"] == "image/png"

    # "out" and "out2" are separate roots, though one is a string prefix of the other.
    neighbour = open_storage(f"s3://{s3_bucket.bucket}/out2")
    neighbour.put_bytes("ds/job.png", b"other")
    assert list(storage.list_keys()) == ["ds/job.png"]
    assert open_storage(f"s3://{s3_bucket.bucket}/out/").get_bytes("ds/job.png") == b"png"


def test_s3_endpoint_argument_wins_over_the_environment(
    s3_bucket: S3Bucket, closed_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMNI_S3_ENDPOINT_URL", f"http://127.0.0.1:{closed_port}")
    storage = open_storage(s3_bucket.uri, endpoint_url=s3_bucket.endpoint_url)
    storage.put_bytes("ds/job.json", b"{}")
    assert storage.exists("ds/job.json")


def test_s3_unreachable_endpoint_is_unavailable_within_seconds(s3_server: S3Server, closed_port: int) -> None:
    endpoint = f"http://127.0.0.1:{closed_port}"
    storage = open_storage("s3://omni-test-nowhere/out", endpoint_url=endpoint)
    started = time.monotonic()
    with pytest.raises(StorageUnavailableError) as info:
        storage.put_bytes("ds/job.png", b"x")  # the default settings: retries included
    assert time.monotonic() - started < 5
    assert "s3://omni-test-nowhere/out/ds/job.png" in str(info.value)
    _assert_no_secret(str(info.value))

    one_try = S3Storage(
        "omni-test-nowhere", "out", endpoint_url=endpoint, settings=S3Settings(max_attempts=1)
    )
    for operation in _every_operation(one_try, "ds/job.png"):
        with pytest.raises(StorageUnavailableError, match="s3://omni-test-nowhere/out"):
            operation()


def test_s3_missing_bucket_is_a_permanent_error(s3_server: S3Server) -> None:
    storage = open_storage("s3://omni-test-no-such-bucket/out")
    for operation in _every_operation(storage, "ds/job.json"):
        with pytest.raises(StorageError, match=r"omni-test-no-such-bucket.*NoSuchBucket") as info:
            operation()
        assert not isinstance(info.value, StorageUnavailableError)
        _assert_no_secret(str(info.value))


@pytest.mark.parametrize(
    ("status", "code", "error"),
    [
        (503, "SlowDown", StorageUnavailableError),
        (500, "InternalError", StorageUnavailableError),
        (400, "RequestTimeout", StorageUnavailableError),
        (403, "AccessDenied", StorageError),
    ],
)
def test_s3_error_answers_are_told_apart(
    failing_s3: Callable[[int, str], FailingS3], status: int, code: str, error: type[StorageError]
) -> None:
    server = failing_s3(status, code)
    storage = S3Storage(
        "omni-test-bucket", "out", endpoint_url=server.endpoint_url, settings=S3Settings(max_attempts=1)
    )
    operations = _every_operation(storage, "ds/job.json")
    for operation in operations:
        with pytest.raises(StorageError, match=code) as info:
            operation()
        assert type(info.value) is error
    assert len(server.requests) == len(operations)  # max_attempts counts the first try


def test_s3_retries_a_transient_error_a_bounded_number_of_times(
    failing_s3: Callable[[int, str], FailingS3],
) -> None:
    server = failing_s3(503, "SlowDown")
    storage = open_storage("s3://omni-test-bucket/out", endpoint_url=server.endpoint_url)
    with pytest.raises(StorageUnavailableError, match="SlowDown"):
        storage.put_bytes("ds/job.png", b"x")
    assert server.requests == ["PUT /omni-test-bucket/out/ds/job.png"] * S3Settings().max_attempts


# ---------------------------------------------------------------- URIs


@pytest.mark.parametrize(
    ("uri", "kind", "normalised"),
    [
        ("s3://omni-bucket/a/b", S3Storage, "s3://omni-bucket/a/b"),
        ("s3://omni-bucket/a/b/", S3Storage, "s3://omni-bucket/a/b"),
        ("s3://omni-bucket", S3Storage, "s3://omni-bucket"),
        ("S3://omni-bucket/a", S3Storage, "s3://omni-bucket/a"),
        ("file:///srv/out", LocalStorage, "/srv/out"),
        ("file://localhost/srv/my%20out", LocalStorage, "/srv/my out"),
        ("/srv/out", LocalStorage, "/srv/out"),
    ],
)
def test_open_storage_understands_its_uris(uri: str, kind: type, normalised: str) -> None:
    storage = open_storage(uri)
    assert isinstance(storage, kind)
    assert storage.uri == normalised


def test_a_relative_directory_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert open_storage("out").uri == str(tmp_path / "out")


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "gs://bucket/p",
        "s3://",
        "s3:///p",
        "s3://bucket/p?versionId=1",
        "s3://bucket/../p",
        "file://host/x",
    ],
)
def test_unusable_uris_are_refused(uri: str) -> None:
    with pytest.raises(InvalidStorageURIError):
        open_storage(uri)


def test_credentials_in_a_uri_are_refused_without_being_repeated() -> None:
    with pytest.raises(InvalidStorageURIError, match="must not carry credentials") as info:
        open_storage("s3://AKIAEXAMPLE:omni-uri-secret@omni-bucket/out")
    assert "omni-uri-secret" not in str(info.value)
    assert "AKIAEXAMPLE" not in str(info.value)

    with pytest.raises(InvalidStorageURIError, match="must not carry credentials") as info:
        open_storage("s3://omni-bucket/out", endpoint_url="http://user:omni-endpoint-secret@127.0.0.1:9000")
    assert "omni-endpoint-secret" not in str(info.value)


def test_an_endpoint_that_is_not_http_is_refused() -> None:
    with pytest.raises(InvalidStorageURIError, match="http"):
        open_storage("s3://omni-bucket/out", endpoint_url="ftp://127.0.0.1:9000")
