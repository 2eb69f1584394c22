"""The output key layout: the keys the worker writes are the keys status recognises."""

from __future__ import annotations

import pytest

from producer.errors import InvalidStorageKeyError
from producer.layout import (
    OutputKind,
    OutputRef,
    classify_key,
    dataset_prefix,
    error_key,
    image_key,
    sidecar_key,
)


def test_keys_follow_the_contract_layout() -> None:
    assert dataset_prefix("ds") == "ds/"
    assert image_key("ds", "job-1") == "ds/job-1.png"
    assert sidecar_key("ds", "job-1") == "ds/job-1.json"
    assert error_key("ds", "job-1") == "ds/job-1.error.json"


@pytest.mark.parametrize(
    ("make_key", "kind"),
    [(image_key, OutputKind.IMAGE), (sidecar_key, OutputKind.SIDECAR), (error_key, OutputKind.ERROR)],
)
@pytest.mark.parametrize("job_id", ["job-1", "a.b_c", "0" * 32, ".hidden"])
def test_classify_key_inverts_the_layout(make_key, kind: OutputKind, job_id: str) -> None:
    assert classify_key(make_key("my.set", job_id)) == OutputRef("my.set", job_id, kind)


@pytest.mark.parametrize(
    "key",
    [
        "job.json",
        "ds/sub/job.json",
        "ds/job.txt",
        "ds/.json",
        "ds/.error.json",
        "../job.json",
        "ds/..png",
        "",
    ],
)
def test_classify_key_ignores_what_is_not_an_output(key: str) -> None:
    assert classify_key(key) is None


@pytest.mark.parametrize(
    ("dataset", "job_id"),
    [
        ("..", "job"),
        (".", "job"),
        ("a/b", "job"),
        ("", "job"),
        ("ds", "../job"),
        ("ds", ""),
        ("ds", "x" * 129),
    ],
)
def test_names_that_are_not_plain_names_are_refused(dataset: str, job_id: str) -> None:
    with pytest.raises(InvalidStorageKeyError, match="cannot name an output"):
        image_key(dataset, job_id)
