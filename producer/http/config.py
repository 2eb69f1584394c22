"""What the API server runs with: where jobs go, where results are read, who may call, how much.

Built once by `omni-batch serve` from its flags and the environment (`producer.settings`), then
handed to `create_app`, so the app itself never reads the environment.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from producer.errors import SettingsError
from producer.settings import ENV_API_TOKENS

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
# A job is at most about 25 KB of JSON (16 KiB metadata, two 2000-character prompts).
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_JOBS = 10_000
DEFAULT_IMAGES_DATASET = "images"
# How long POST /v1/images/generations waits for its images before answering 202.
DEFAULT_WAIT_S = 60.0
MAX_WAIT_S = 600.0
# Lifetime of a presigned S3 URL handed out for an image or a sidecar.
DEFAULT_URL_EXPIRES_S = 3600
MIN_TOKEN_CHARS = 16


@dataclass(frozen=True, kw_only=True)
class ApiConfig:
    """The server's settings. `tokens` empty: no auth, and only a loopback address may be bound."""

    broker_url: str
    output_uri: str
    adapter_roots: tuple[str, ...] = ()
    tokens: tuple[str, ...] = ()
    images_dataset: str = DEFAULT_IMAGES_DATASET
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_jobs: int = DEFAULT_MAX_JOBS
    wait_s: float = DEFAULT_WAIT_S
    url_expires_s: int = DEFAULT_URL_EXPIRES_S

    def __post_init__(self) -> None:
        short = [i for i, token in enumerate(self.tokens, start=1) if len(token) < MIN_TOKEN_CHARS]
        if short:
            # The token itself is never echoed, only its position in the list.
            raise SettingsError(
                f"${ENV_API_TOKENS}: token(s) number {', '.join(map(str, short))} are shorter than "
                f"{MIN_TOKEN_CHARS} characters; use long random tokens (e.g. `openssl rand -hex 32`)"
            )
        for name in ("max_body_bytes", "max_jobs", "url_expires_s"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.wait_s <= MAX_WAIT_S:
            raise SettingsError(f"the wait must be 0..{MAX_WAIT_S:g} seconds, got {self.wait_s:g}")


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address (or `localhost`), reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, config: ApiConfig) -> None:
    """Refuse to serve anything but loopback without a token: an open queue is anyone's GPU."""
    if not config.tokens and not is_loopback(host):
        raise SettingsError(
            f"refusing to listen on {host!r} with no API token: set ${ENV_API_TOKENS} "
            f"(comma-separated bearer tokens) or listen on {DEFAULT_HOST}"
        )
