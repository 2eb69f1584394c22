"""The API's own rules, as plain functions: a LoRA path to an adapter name, the wait a client asks
for, the settings the server refuses to run with."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from producer.errors import SettingsError
from producer.http.config import ApiConfig, check_bind, is_loopback
from producer.http.errors import ApiError
from producer.http.images import LoraSpec, adapter_name, prefer_wait


def name(roots: tuple[str, ...], **lora: str) -> str:
    return adapter_name(LoraSpec(**lora), roots)


def refusal(roots: tuple[str, ...], **lora: str) -> str:
    with pytest.raises(ApiError) as e:
        name(roots, **lora)
    assert e.value.status == 422
    return e.value.detail.message


def test_a_path_under_a_root_becomes_the_adapter_name(tmp_path: Path) -> None:
    roots = (str(tmp_path / "a"), str(tmp_path / "b"))
    assert name(roots, local_path=str(tmp_path / "b" / "styles" / "ink")) == "styles/ink"
    assert name(roots, path=str(tmp_path / "a" / "ink") + "/") == "ink"
    assert name((), local_path="styles/ink") == "styles/ink"  # already a name: the job schema checks it


def test_a_root_reached_through_a_symlink_still_names_the_adapter(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    assert name((str(tmp_path / "link"),), local_path=str(tmp_path / "real" / "ink")) == "ink"


@pytest.mark.parametrize(
    ("lora", "reason"),
    [
        ({"local_path": "/etc/secrets"}, "lora.local_path = '/etc/secrets' is not under the adapter roots"),
        ({"local_path": "/adapters/../etc"}, "is not under the adapter roots"),
        ({"local_path": "/adapters"}, "is not under the adapter roots"),  # the root itself is no adapter
        ({"path": "/adapters-evil/x"}, "lora.path = '/adapters-evil/x' is not under"),
        ({"local_path": "/adapters/a", "path": "/adapters/b"}, "local_path and path differ"),
        ({"name": "only-a-label"}, "give local_path (or path)"),
    ],
)
def test_paths_outside_the_roots_are_refused_with_the_field_named(lora: dict, reason: str) -> None:
    assert reason in refusal(("/adapters",), **lora)


def test_an_absolute_path_needs_the_server_to_know_the_roots() -> None:
    assert "this server has no adapter roots" in refusal((), local_path="/adapters/ink")


@pytest.mark.parametrize(
    ("prefer", "wait"),
    [(None, 60.0), ("wait=5", 5.0), ("respond-async, wait=0", 0.0), ("wait=100000", 600.0), ("wait=x", 60.0)],
)
def test_the_wait_is_the_clients_prefer_header_capped_or_the_servers_default(prefer, wait) -> None:
    assert prefer_wait(prefer, 60.0) == wait


def test_the_server_refuses_short_tokens_without_echoing_them_and_public_addresses_without_any() -> None:
    with pytest.raises(SettingsError) as short:
        tokens = ("long-enough-token-123", "short-secret")
        ApiConfig(broker_url="redis://h/0", output_uri="/out", tokens=tokens)
    assert "number 2" in str(short.value) and "short-secret" not in str(short.value)

    open_server = ApiConfig(broker_url="redis://h/0", output_uri="/out")
    for host in ("127.0.0.1", "::1", "[::1]", "localhost", "127.0.0.2"):
        assert is_loopback(host)
        check_bind(host, open_server)
    for host in ("0.0.0.0", "::", "10.0.0.1", "example.com"):
        with pytest.raises(SettingsError, match="no API token"):
            check_bind(host, open_server)
    check_bind("0.0.0.0", ApiConfig(broker_url="redis://h/0", output_uri="/out", tokens=("x" * 32,)))


def test_serve_without_the_api_extra_says_what_to_install(tmp_path: Path) -> None:
    # The plain install has no FastAPI: make `import fastapi` fail, as it would there.
    code = (
        "import sys; sys.modules['fastapi'] = None\n"
        "from producer.cli import main\n"
        f"sys.exit(main(['serve', '--out', {str(tmp_path)!r}]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "needs the api extra (fastapi is missing): pip install 'omni-batch[api]'" in done.stderr
