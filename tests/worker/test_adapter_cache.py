"""Adapters under s3:// roots: fetched whole into a shared, size-bounded disk cache, or not at all.

Everything goes over HTTP to moto's server, through a TCP proxy (fixtures.tcp_proxy) that counts
requests and breaks transfers as a network would. The cache does not read adapters, so most files
here are random bytes; tests/worker/test_s3_adapters.py runs real adapters through the engine.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from fixtures.s3_server import S3Bucket
from fixtures.tcp_proxy import TcpProxy

from omni_engine.errors import AdapterAccessError, AdapterNotFoundError, InvalidAdapterError
from producer.errors import SettingsError
from producer.settings import ENV_ADAPTER_ROOTS, read_environment
from worker.adapter_cache import AdapterCache
from worker.adapters import AdapterResolver
from worker.errors import AdapterDownloadError
from worker.settings import WorkerSettings

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
SIZE = 64 * 1024
DEADLINE_S = 60.0
POLL_S = 0.05


def random_files(seed: int, size: int = SIZE) -> dict[str, bytes]:
    """An adapter directory's two files, as bytes (the cache never parses them)."""
    weights = hashlib.shake_256(seed.to_bytes(8, "big")).digest(size)
    return {CONFIG: b'{"r": %d}' % seed, WEIGHTS: weights}


def upload(bucket: S3Bucket, name: str, files: dict[str, bytes]) -> None:
    for filename, data in files.items():
        bucket.client.put_object(Bucket=bucket.bucket, Key=f"adapters/{name}/{filename}", Body=data)


def root_of(bucket: S3Bucket) -> str:
    return f"s3://{bucket.bucket}/adapters"


@pytest.fixture
def make_resolver(s3_bucket: S3Bucket, s3_proxy: TcpProxy, tmp_path: Path) -> Callable[..., AdapterResolver]:
    """make_resolver(max_bytes=..., in_use=...): a resolver over the bucket's `adapters` root, through
    the proxy, with its cache in tmp_path/cache (one per call: each as another worker process would)."""

    def make(*, max_bytes: int = 10 * SIZE, in_use: int = 8) -> AdapterResolver:
        cache = AdapterCache(
            tmp_path / "cache", max_bytes=max_bytes, in_use=in_use, endpoint_url=s3_proxy.endpoint_url
        )
        return AdapterResolver([root_of(s3_bucket)], cache=cache)

    return make


def entries(cache_dir: Path) -> list[str]:
    """What the cache directory holds besides lock files: entries and partial downloads."""
    return sorted(p.name for p in cache_dir.iterdir() if not p.name.endswith(".lock"))


def test_a_directory_adapter_is_fetched_once_with_only_what_the_engine_reads(
    s3_bucket, s3_proxy, make_resolver
) -> None:
    files = random_files(1)
    upload(s3_bucket, "styles/ink", {**files, "README.md": b"hi", "old.bin": b"pickle"})
    resolver = make_resolver()

    first = resolver.resolve("styles/ink")
    path = Path(first.lora_path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == files
    again = resolver.resolve("styles/ink")
    assert (again.lora_path, again.lora_int_id) == (first.lora_path, first.lora_int_id)
    assert s3_proxy.count(f"GET /{s3_bucket.bucket}/adapters/styles/ink/{WEIGHTS}") == 1
    assert s3_proxy.count("README.md") == s3_proxy.count("old.bin") == 0
    assert s3_proxy.count("list-type=2") == 2  # each resolve costs one listing


def test_a_weights_file_named_directly_resolves_to_its_local_copy(s3_bucket, make_resolver) -> None:
    data = random_files(2)[WEIGHTS]
    s3_bucket.client.put_object(Bucket=s3_bucket.bucket, Key="adapters/loose/ink.safetensors", Body=data)
    path = Path(make_resolver().resolve("loose/ink.safetensors").lora_path)
    assert path.name == "ink.safetensors" and path.read_bytes() == data


def test_a_changed_object_is_a_new_adapter_and_never_the_stale_copy(s3_bucket, make_resolver) -> None:
    resolver = make_resolver()
    upload(s3_bucket, "styles/ink", random_files(1))
    old = resolver.resolve("styles/ink")
    upload(s3_bucket, "styles/ink", {WEIGHTS: random_files(3)[WEIGHTS]})  # weights replaced, config kept

    new = resolver.resolve("styles/ink")
    assert new.lora_path != old.lora_path and new.lora_int_id != old.lora_int_id
    assert (Path(new.lora_path) / WEIGHTS).read_bytes() == random_files(3)[WEIGHTS]
    assert (Path(old.lora_path) / WEIGHTS).read_bytes() == random_files(1)[WEIGHTS]


def test_a_vanished_adapter_is_not_found_by_name(s3_bucket, make_resolver) -> None:
    resolver = make_resolver()
    upload(s3_bucket, "styles/ink", random_files(1))
    resolver.resolve("styles/ink")
    for filename in (CONFIG, WEIGHTS):
        s3_bucket.client.delete_object(Bucket=s3_bucket.bucket, Key=f"adapters/styles/ink/{filename}")
    with pytest.raises(AdapterNotFoundError, match="'styles/ink': not found under the adapter roots"):
        resolver.resolve("styles/ink")


@pytest.mark.parametrize(
    ("meanwhile", "error", "reason"),
    [
        ("deleted", AdapterNotFoundError, "was deleted while it was being fetched"),
        ("replaced", AdapterDownloadError, "changed while it was being fetched"),
    ],
)
def test_an_object_deleted_or_replaced_between_listing_and_download_is_never_mixed_in(
    meanwhile, error, reason, s3_bucket, s3_proxy, make_resolver, tmp_path
) -> None:
    upload(s3_bucket, "styles/ink", random_files(1))
    resolver = make_resolver()
    listing = s3_proxy.hold("list-type=2", after=1)
    failed: list[BaseException] = []

    def resolve() -> None:
        try:
            resolver.resolve("styles/ink")
        except Exception as e:  # any, to be named by the assertion below
            failed.append(e)

    thread = threading.Thread(target=resolve)
    thread.start()
    assert listing.reached.wait(DEADLINE_S)  # the listing is made, and on its way back
    if meanwhile == "deleted":
        for filename in (CONFIG, WEIGHTS):
            s3_bucket.client.delete_object(Bucket=s3_bucket.bucket, Key=f"adapters/styles/ink/{filename}")
    else:
        upload(s3_bucket, "styles/ink", random_files(2))
    s3_proxy.clear()
    thread.join(DEADLINE_S)

    assert [type(e) for e in failed] == [error] and reason in str(failed[0])
    assert "'styles/ink'" in str(failed[0])
    assert entries(tmp_path / "cache") == []


def test_a_download_cut_off_halfway_keeps_nothing_and_the_next_try_succeeds(
    s3_bucket, s3_proxy, make_resolver, tmp_path
) -> None:
    files = random_files(1)
    upload(s3_bucket, "styles/ink", files)
    resolver = make_resolver()
    cut = s3_proxy.cut(f"GET /{s3_bucket.bucket}/adapters/styles/ink/{WEIGHTS}", after=SIZE // 2)

    with pytest.raises(AdapterDownloadError, match=r"'styles/ink': the download of .* broke off after"):
        resolver.resolve("styles/ink")
    assert cut.reached.is_set()
    assert entries(tmp_path / "cache") == []

    s3_proxy.clear()
    path = Path(resolver.resolve("styles/ink").lora_path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == files


@pytest.mark.parametrize("checksum", ["CRC32", None])
def test_a_corrupted_download_is_refused_by_checksum_or_md5_and_nothing_is_kept(
    checksum, s3_bucket, s3_proxy, make_resolver, tmp_path
) -> None:
    # boto3 sends a CRC32 with each upload, which S3 keeps; an upload without one leaves the ETag.
    uploader = s3_bucket.client
    if checksum is None:
        config = Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required")
        uploader = boto3.session.Session().client("s3", endpoint_url=s3_bucket.endpoint_url, config=config)
    key = f"adapters/styles/ink/{WEIGHTS}"
    uploader.put_object(Bucket=s3_bucket.bucket, Key=key, Body=random_files(1)[WEIGHTS])
    head = s3_bucket.client.head_object(Bucket=s3_bucket.bucket, Key=key, ChecksumMode="ENABLED")
    assert ("ChecksumCRC32" in head) == (checksum is not None)
    flipped = s3_proxy.flip(f"GET /{s3_bucket.bucket}/{key}", at=SIZE // 2)

    reason = "its checksum" if checksum else r"its ETag \(an MD5\)"
    with pytest.raises(AdapterDownloadError, match=rf"'styles/ink': the bytes of .* do not match {reason}"):
        make_resolver().resolve("styles/ink")
    assert flipped.reached.is_set()
    assert entries(tmp_path / "cache") == []


def test_names_that_could_leave_the_root_are_refused_before_any_request(
    s3_bucket, s3_proxy, make_resolver
) -> None:
    upload(s3_bucket, "styles/ink", random_files(1))
    resolver = make_resolver()
    for name in ("../adapters/styles/ink", "styles/../styles/ink", "/adapters/styles/ink", "styles/./ink"):
        with pytest.raises(AdapterAccessError, match=r"segment|relative"):
            resolver.resolve(name)
    assert s3_proxy.request_lines == []


def test_a_name_matches_its_own_key_only_not_a_longer_one(s3_bucket, make_resolver) -> None:
    upload(s3_bucket, "styles/ink-v2", random_files(1))
    s3_bucket.client.put_object(Bucket=s3_bucket.bucket, Key="adapters/styles/ink.safetensors", Body=b"x")
    with pytest.raises(AdapterNotFoundError):
        make_resolver().resolve("styles/ink")


def test_pickle_weights_are_refused_and_never_fetched(s3_bucket, s3_proxy, make_resolver) -> None:
    upload(s3_bucket, "styles/old", {CONFIG: b"{}", "adapter_model.bin": b"pickle"})
    s3_bucket.client.put_object(Bucket=s3_bucket.bucket, Key="adapters/loose/old.ckpt", Body=b"pickle")
    resolver = make_resolver()
    with pytest.raises(InvalidAdapterError, match=r"only pickle weights, never fetched: adapter_model\.bin"):
        resolver.resolve("styles/old")
    with pytest.raises(InvalidAdapterError, match=r"not a \.safetensors file"):
        resolver.resolve("loose/old.ckpt")
    assert not any(line.startswith("GET") and "list-type" not in line for line in s3_proxy.request_lines)


def test_an_adapter_larger_than_the_whole_cache_is_refused_by_name(s3_bucket, make_resolver) -> None:
    upload(s3_bucket, "styles/huge", random_files(1))
    with pytest.raises(AdapterDownloadError, match=r"'styles/huge': .* more than the whole adapter cache"):
        make_resolver(max_bytes=SIZE).resolve("styles/huge")


def test_over_its_bound_the_cache_evicts_the_least_recently_used_entry(
    s3_bucket, make_resolver, tmp_path
) -> None:
    for i, name in enumerate(("a", "b", "c")):
        upload(s3_bucket, name, random_files(i))
    # Room for two adapters; this worker marks only its last one in use.
    resolver = make_resolver(max_bytes=int(2.5 * SIZE), in_use=1)
    a = resolver.resolve("a").lora_path
    b = resolver.resolve("b").lora_path
    resolver.resolve("a")  # a is used again: b is now the least recently used
    c = resolver.resolve("c").lora_path

    assert [os.path.isdir(path) for path in (a, b, c)] == [True, False, True]
    assert entries(tmp_path / "cache") == sorted(Path(p).name for p in (a, c))


def test_an_entry_another_worker_holds_is_never_evicted(s3_bucket, make_resolver) -> None:
    for i, name in enumerate(("a", "b", "c")):
        upload(s3_bucket, name, random_files(i))
    # Two workers sharing one cache with room for one adapter, each holding its last one.
    first, second = (
        make_resolver(max_bytes=int(1.5 * SIZE), in_use=1),
        make_resolver(max_bytes=int(1.5 * SIZE), in_use=1),
    )
    a = first.resolve("a").lora_path
    b = second.resolve("b").lora_path
    assert os.path.isdir(a) and os.path.isdir(b)  # over the bound rather than a held entry deleted

    c = first.resolve("c").lora_path  # the first worker now holds c only: a may go, b may not
    assert [os.path.isdir(path) for path in (a, b, c)] == [False, True, True]


def _resolve_in_subprocess(bucket: S3Bucket, endpoint_url: str, cache_dir: Path) -> subprocess.Popen:
    """Another worker process on this host resolving `styles/ink`; it prints the path it got."""
    code = (
        "import sys\n"
        "from worker.adapter_cache import AdapterCache\n"
        "from worker.adapters import AdapterResolver\n"
        "cache = AdapterCache(sys.argv[1], max_bytes=10**9, in_use=4, endpoint_url=sys.argv[2])\n"
        "print(AdapterResolver([sys.argv[3]], cache=cache).resolve('styles/ink').lora_path)\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, str(cache_dir), endpoint_url, root_of(bucket)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(POLL_S)  # polling a condition with a deadline


def _waiting_for_a_lock(pid: int) -> bool:
    """Whether `pid` is blocked on a flock (a `->` line of /proc/locks)."""
    return any(
        "-> FLOCK" in line and f" {pid} " in line for line in Path("/proc/locks").read_text().splitlines()
    )


def test_two_processes_fetching_one_adapter_download_it_once_and_both_get_it_whole(
    s3_bucket, s3_proxy, tmp_path
) -> None:
    files = random_files(1)
    upload(s3_bucket, "styles/ink", files)
    weights_get = f"GET /{s3_bucket.bucket}/adapters/styles/ink/{WEIGHTS}"
    held = s3_proxy.hold(weights_get, after=SIZE // 2)
    first = _resolve_in_subprocess(s3_bucket, s3_proxy.endpoint_url, tmp_path / "cache")
    assert held.reached.wait(DEADLINE_S), first.communicate()  # the first is mid-download
    second = _resolve_in_subprocess(s3_bucket, s3_proxy.endpoint_url, tmp_path / "cache")
    _wait_until(lambda: _waiting_for_a_lock(second.pid), "the second process waits for the first")
    held.release.set()

    paths = []
    for process in (first, second):
        out, err = process.communicate(timeout=DEADLINE_S)
        assert process.returncode == 0, err
        paths.append(Path(out.strip()))
    assert paths[0] == paths[1]
    assert {p.name: p.read_bytes() for p in paths[0].iterdir()} == files
    assert s3_proxy.count(weights_get) == 1


def test_a_process_killed_mid_download_leaves_nothing_that_counts(
    s3_bucket, s3_proxy, make_resolver, tmp_path
):
    files = random_files(1)
    upload(s3_bucket, "styles/ink", files)
    held = s3_proxy.hold(f"GET /{s3_bucket.bucket}/adapters/styles/ink/{WEIGHTS}", after=SIZE // 2)
    killed = _resolve_in_subprocess(s3_bucket, s3_proxy.endpoint_url, tmp_path / "cache")
    assert held.reached.wait(DEADLINE_S), killed.communicate()
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    s3_proxy.clear()
    assert [name.endswith(".partial") for name in entries(tmp_path / "cache")] == [True]

    path = Path(make_resolver().resolve("styles/ink").lora_path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == files
    assert entries(tmp_path / "cache") == [path.name]


def test_adapter_roots_mix_directories_and_s3_and_the_engine_may_read_the_cache(tmp_path) -> None:
    text = os.pathsep.join(["/srv/adapters", "s3://bkt/adapters/sd3"])
    env = read_environment({ENV_ADAPTER_ROOTS: text})
    assert env.adapter_roots == ("/srv/adapters", "s3://bkt/adapters/sd3")
    settings = WorkerSettings(adapter_roots=env.adapter_roots, adapter_cache_dir=str(tmp_path / "c"))
    assert settings.engine_adapter_roots == ["/srv/adapters", str(tmp_path / "c")]
    assert WorkerSettings(adapter_roots=("/srv/adapters",)).engine_adapter_roots == ["/srv/adapters"]
    with pytest.raises(SettingsError, match="give a directory or s3://bucket/prefix"):
        WorkerSettings(adapter_roots=("gs://bkt/adapters",))
    with pytest.raises(SettingsError, match="adapter cache size"):
        WorkerSettings(adapter_cache_bytes=0)
