"""Credential masking: one rule for broker URLs in messages and for refused jobs in records."""

from __future__ import annotations

import pytest

from producer.redact import redact, redact_credentials


@pytest.mark.parametrize(
    ("url", "safe"),
    [
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
        ("redis://:pw@host:6379/0", "redis://***@host:6379/0"),
        ("rediss://user:p%40ss@host/1", "rediss://***@host/1"),
        ("s3://AKIAEXAMPLE:SeCrEt@bucket/x", "s3://***@bucket/x"),
        ("redis://host/0?password=pw&db=1", "redis://host/0?password=***&db=1"),
        (
            "sentinel://:a@h1:26379;sentinel://:b@h2:26379",
            "sentinel://***@h1:26379;sentinel://***@h2:26379",
        ),
    ],
)
def test_redact_masks_user_info_and_password_parameters(url: str, safe: str) -> None:
    assert redact(url) == safe


def test_redact_credentials_masks_every_string_of_a_json_value() -> None:
    job = {
        "prompt": "a cat",
        "output": "s3://KEY:SECRET@bucket/x",
        "metadata": {"urls": ["redis://:pw@h/0", 3], "redis://u:pw@h/0": None},
    }
    assert redact_credentials(job) == {
        "prompt": "a cat",
        "output": "s3://***@bucket/x",
        "metadata": {"urls": ["redis://***@h/0", 3], "redis://***@h/0": None},
    }
