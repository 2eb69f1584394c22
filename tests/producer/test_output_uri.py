"""The output URI: one parser, so the URIs a job may carry are the URIs storage opens."""

from __future__ import annotations

import pytest

from producer.errors import InvalidStorageURIError, JobValidationError
from producer.output_uri import LocalLocation, S3Location, parse_output_uri
from producer.schema import validate_job
from producer.storage import open_storage


@pytest.mark.parametrize(
    ("uri", "location"),
    [
        ("s3://my-bucket", S3Location("my-bucket", "")),
        ("s3://my.bucket-1/a/b/", S3Location("my.bucket-1", "a/b")),
        ("S3://omni-bucket/a", S3Location("omni-bucket", "a")),
        ("/data/out", LocalLocation("/data/out")),
        ("relative/out", LocalLocation("relative/out")),
        ("file:///data/my%20out", LocalLocation("/data/my out")),
    ],
)
def test_good_uris_parse(uri: str, location: S3Location | LocalLocation) -> None:
    assert parse_output_uri(uri) == location


BAD = [
    "",
    "gs://bucket/p",
    "s3:bucket/p",
    "s3://ab/p",
    "s3://Bad_Bucket/p",
    "s3://bucket..name/p",
    "s3://192.168.1.1/p",
    "s3://bucket/x?versionId=1",
    "s3://bucket:9000/x",
    "s3://bucket/a/../b",
    "s3://bucket/a//b",
    "/data/out\x00",
    "file://host/data",
]


@pytest.mark.parametrize("uri", BAD)
def test_the_schema_and_storage_refuse_the_same_uris(uri: str) -> None:
    with pytest.raises(InvalidStorageURIError):
        parse_output_uri(uri)
    with pytest.raises(InvalidStorageURIError):
        open_storage(uri)
    if uri:  # an empty output is refused by the schema's own length rule
        with pytest.raises(JobValidationError, match="output"):
            validate_job({"prompt": "p", "output": uri})


def test_credentials_are_refused_and_never_repeated() -> None:
    with pytest.raises(InvalidStorageURIError, match="must not carry credentials") as info:
        parse_output_uri("s3://AKIAEXAMPLE:omni-secret@bucket/out")
    assert "omni-secret" not in str(info.value) and "AKIAEXAMPLE" not in str(info.value)
    with pytest.raises(InvalidStorageURIError) as info:
        parse_output_uri("file://user:omni-secret@host/data")
    assert "omni-secret" not in str(info.value)
