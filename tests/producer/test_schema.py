"""The job schema: defaults, derived ids and seeds, every rule, error messages."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from producer.errors import JobValidationError, ProducerError
from producer.schema import Job, parse_job_line, validate_job

FIELDS = [
    "job_id",
    "dataset",
    "prompt",
    "negative_prompt",
    "adapter",
    "scale",
    "seed",
    "steps",
    "guidance_scale",
    "width",
    "height",
    "priority",
    "output",
    "metadata",
]


def problems(data: object) -> list[str]:
    with pytest.raises(JobValidationError) as info:
        validate_job(data)
    return info.value.problems


# --- defaults and derived values ---------------------------------------------------------------


def test_defaults_of_a_minimal_job() -> None:
    wire = Job(prompt="a cat").wire_dict()
    assert list(wire) == FIELDS
    assert wire["dataset"] == "default"
    assert wire["scale"] == 1.0
    assert wire["priority"] == 5
    assert wire["metadata"] == {}
    for field in ["negative_prompt", "adapter", "steps", "guidance_scale", "width", "height", "output"]:
        assert wire[field] is None, field


def test_derived_job_id_is_sha256_of_the_documented_canonical_form() -> None:
    # Pinned so any other client (or language) can derive the same id: sorted keys, compact
    # separators, every field but job_id and priority, defaults applied.
    assert Job(prompt="a cat").job_id == "930595d2426928c34b6516b9f34934b9"


def test_same_job_twice_gives_the_same_job_id() -> None:
    line = '{"prompt": "a cat", "adapter": "styles/ink", "scale": 0.5, "metadata": {"b": 1, "a": [1, 2]}}'
    assert parse_job_line(line).job_id == parse_job_line(line).job_id


def test_spelled_out_defaults_and_key_order_do_not_change_the_job_id() -> None:
    short = parse_job_line('{"prompt": "a cat", "metadata": {"x": 1, "y": 2}}')
    spelled = parse_job_line(
        '{"metadata": {"y": 2, "x": 1}, "scale": 1, "dataset": "default", "adapter": null, "prompt": "a cat"}'
    )
    assert short.job_id == spelled.job_id


def test_priority_does_not_change_the_job_id() -> None:
    # Same image, same place: re-submitting at another urgency must not make a second image.
    assert Job(prompt="a cat", priority=0).job_id == Job(prompt="a cat", priority=9).job_id


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("dataset", "other"),
        ("prompt", "a dog"),
        ("negative_prompt", "blurry"),
        ("adapter", "styles/ink"),
        ("scale", 0.5),
        ("seed", 7),
        ("steps", 20),
        ("guidance_scale", 3.5),
        ("width", 64),
        ("height", 64),
        ("output", "s3://bucket/prefix"),
        ("metadata", {"k": "v"}),
    ],
)
def test_every_field_that_shapes_the_output_changes_the_job_id(field: str, value: object) -> None:
    assert validate_job({"prompt": "a cat", field: value}).job_id != Job(prompt="a cat").job_id


def test_derived_seed_is_stable_and_follows_the_job_id() -> None:
    job = validate_job({"prompt": "a cat", "job_id": "job-1"})
    assert job.seed == 174151894793320618  # int(sha256("job-1")[:16], 16) & (2**63 - 1)
    assert validate_job({"prompt": "a dog", "job_id": "job-1"}).seed == job.seed
    assert validate_job({"prompt": "a cat", "job_id": "job-2"}).seed != job.seed


def test_given_job_id_and_seed_are_kept() -> None:
    job = validate_job({"prompt": "a cat", "job_id": "mine", "seed": 42})
    assert (job.job_id, job.seed) == ("mine", 42)


def test_null_job_id_and_seed_mean_derive_them() -> None:
    assert validate_job({"prompt": "a cat", "job_id": None, "seed": None}) == Job(prompt="a cat")


def test_wire_dict_is_json_and_validates_back_to_the_same_job() -> None:
    job = Job(prompt="a cat", adapter="a/b", scale=-2, width=64, height=32, metadata={"t": (1, 2)})
    wire = json.loads(json.dumps(job.wire_dict(), allow_nan=False))
    assert wire == job.wire_dict()
    assert wire["metadata"] == {"t": [1, 2]}
    assert Job.model_validate(wire) == job


def test_a_job_missing_optional_fields_gets_the_producers_defaults() -> None:
    # A job sent by any Celery client, with just the required field and its id.
    job = Job(prompt="a cat", job_id="j-1")
    sparse = {"prompt": "a cat", "job_id": "j-1"}
    assert Job.model_validate(sparse).wire_dict() == job.wire_dict()


def test_job_is_frozen_so_its_id_cannot_go_stale() -> None:
    job = Job(prompt="a cat")
    with pytest.raises(ValidationError):
        job.prompt = "a dog"  # type: ignore[misc]


# --- rules ---------------------------------------------------------------------------------------

REJECTED = [
    ("job_id", ""),
    ("job_id", "a b"),
    ("job_id", "a/b"),
    ("job_id", "x" * 129),
    ("job_id", ".."),
    ("job_id", 5),
    ("dataset", ""),
    ("dataset", "a b"),
    ("dataset", "."),
    ("dataset", ".."),
    ("dataset", "x" * 129),
    ("dataset", None),
    ("prompt", ""),
    ("prompt", "x" * 2001),
    ("prompt", 3),
    ("prompt", None),
    ("prompt", "\ud800"),
    ("negative_prompt", 1),
    ("adapter", ""),
    ("adapter", "/abs/path"),
    ("adapter", "a/../b"),
    ("adapter", ".."),
    ("adapter", "a/./b"),
    ("adapter", "a//b"),
    ("adapter", "a/"),
    ("adapter", "a b"),
    ("adapter", "a\\b"),
    ("adapter", "x" * 257),
    ("scale", math.nan),
    ("scale", math.inf),
    ("scale", 8.01),
    ("scale", -8.01),
    ("scale", True),
    ("scale", "1.0"),
    ("scale", None),
    ("seed", -1),
    ("seed", 2**63),
    ("seed", True),
    ("seed", 1.5),
    ("steps", 0),
    ("steps", 201),
    ("steps", True),
    ("steps", 20.0),
    ("guidance_scale", -0.1),
    ("guidance_scale", 50.1),
    ("guidance_scale", math.nan),
    ("guidance_scale", False),
    ("width", 0),
    ("width", 7),
    ("width", 12),
    ("width", 4104),
    ("width", True),
    ("height", 4097),
    ("height", -8),
    ("priority", -1),
    ("priority", 10),
    ("priority", True),
    ("priority", "5"),
    ("output", ""),
    ("output", "gs://bucket/p"),
    ("output", "s3:bucket/p"),
    ("output", "s3://ab/p"),
    ("output", "s3://Bad_Bucket/p"),
    ("output", "s3://bucket..name/p"),
    ("output", "s3://192.168.1.1/p"),
    ("output", "s3://-bucket/p"),
    ("output", "s3://bucket/x?versionId=1"),
    ("output", "s3://bucket/x#frag"),
    ("output", "s3://bucket:9000/x"),
    ("output", "/data/out\x00"),
    ("output", "file://host/data"),
    ("output", "file:///data?x=1"),
    ("metadata", []),
    ("metadata", "x"),
    ("metadata", {"a": math.nan}),
    ("metadata", {"a": {"b": math.inf}}),
    ("metadata", {"a": "x" * (16 * 1024)}),
]


@pytest.mark.parametrize(("field", "value"), REJECTED)
def test_rule_violations_are_reported_with_field_and_value(field: str, value: object) -> None:
    found = problems({"prompt": "a cat", field: value})
    assert len(found) == 1, found
    assert found[0].startswith(f"{field} = "), found
    assert repr(value)[:20] in found[0]


ACCEPTED = [
    ("job_id", "A-z_0.9"),
    ("job_id", "x" * 128),
    ("dataset", "x" * 128),
    ("prompt", "x" * 2000),
    ("prompt", "ünïcødé 🐈"),
    ("adapter", "org/style-v1.2_x"),
    ("adapter", "x" * 256),
    ("scale", -8),
    ("scale", 8.0),
    ("scale", 0),
    ("seed", 0),
    ("seed", 2**63 - 1),
    ("steps", 1),
    ("steps", 200),
    ("guidance_scale", 0),
    ("guidance_scale", 50),
    ("width", 8),
    ("width", 4096),
    ("height", 1024),
    ("priority", 0),
    ("priority", 9),
    ("output", "s3://my-bucket"),
    ("output", "s3://my.bucket-1/a/b/"),
    ("output", "/data/out"),
    ("output", "relative/out"),
    ("output", "file:///data/out"),
    ("metadata", {"nested": {"list": [1, 2.5, None, True, "s"]}}),
]


@pytest.mark.parametrize(("field", "value"), ACCEPTED)
def test_values_within_the_rules_are_accepted(field: str, value: object) -> None:
    job = validate_job({"prompt": "a cat", field: value})
    assert job.wire_dict()[field] == value


def test_metadata_limit_is_16_kib_of_json() -> None:
    overhead = len(json.dumps({"a": ""}, separators=(",", ":")))
    assert validate_job({"prompt": "p", "metadata": {"a": "x" * (16384 - overhead)}})
    found = problems({"prompt": "p", "metadata": {"a": "x" * (16385 - overhead)}})
    assert "16385 bytes" in found[0]


def test_unknown_fields_are_rejected_by_name() -> None:
    found = problems({"prompt": "a cat", "sead": 1})
    assert found == [found[0]]
    assert found[0].startswith("sead: unknown field"), found


def test_missing_prompt_is_named() -> None:
    assert problems({"adapter": "a"}) == ["prompt: required field is missing"]


def test_every_violation_is_reported_at_once() -> None:
    found = problems({"prompt": "", "width": 12, "steps": 0, "bogus": 1})
    assert [p.split(" ")[0].rstrip(":") for p in found] == ["prompt", "steps", "width", "bogus"]


def test_error_messages_truncate_long_values() -> None:
    (message,) = problems({"prompt": "x" * 2001})
    assert len(message) < 200
    assert "..." in message


def test_error_messages_never_show_credentials() -> None:
    with pytest.raises(JobValidationError) as error:
        validate_job({"prompt": "p", "output": "s3://AKIA:SeCrEt@bucket/x"})
    assert "SeCrEt" not in str(error.value)
    assert "AKIA" not in str(error.value)
    assert "credentials" in str(error.value)


def test_validation_error_is_a_producer_error_and_a_value_error() -> None:
    with pytest.raises(JobValidationError) as error:
        validate_job({})
    assert isinstance(error.value, ProducerError)
    assert isinstance(error.value, ValueError)


# --- parse_job_line ------------------------------------------------------------------------------


@pytest.mark.parametrize("line", ["", "{", "not json", '{"prompt": "a"} trailing', "\xff"])
def test_invalid_json_is_a_schema_error(line: str) -> None:
    with pytest.raises(JobValidationError, match="not valid JSON"):
        parse_job_line(line)


@pytest.mark.parametrize("line", ["[]", "1", '"prompt"', "null"])
def test_a_job_must_be_an_object(line: str) -> None:
    with pytest.raises(JobValidationError, match="must be a JSON object"):
        parse_job_line(line)


def test_defaults_fill_only_absent_fields() -> None:
    defaults = {"adapter": "styles/ink", "width": 64, "dataset": "ds"}
    job = parse_job_line('{"prompt": "p", "width": 128, "adapter": null}', defaults=defaults)
    assert (job.adapter, job.width, job.dataset) == (None, 128, "ds")


def test_non_finite_json_numbers_are_rejected_by_field() -> None:
    with pytest.raises(JobValidationError, match=r"^scale = inf"):
        parse_job_line('{"prompt": "p", "scale": Infinity}')


# --- fuzz ----------------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
plausible = {
    "job_id": st.from_regex(r"[A-Za-z0-9._-]{0,6}", fullmatch=True) | json_values,
    "dataset": st.sampled_from(["default", "ds", "..", ""]) | json_values,
    "prompt": st.text(max_size=30) | st.just("\ud800"),
    "adapter": st.from_regex(r"[a-z./]{0,8}", fullmatch=True) | st.none(),
    "scale": st.floats(-10, 10) | st.integers(-10, 10),
    "seed": st.integers(-2, 2**64),
    "steps": st.integers(-1, 250),
    "guidance_scale": st.floats(allow_nan=True) | st.none(),
    "width": st.integers(0, 5000) | st.none(),
    "height": st.sampled_from([8, 64, 12, 4096, 4104]),
    "priority": st.integers(-1, 10) | st.booleans(),
    "output": st.sampled_from(["s3://bucket/p", "s3://a:b@bucket/p", "gs://x", "/out", "s3:x"]) | st.text(),
    "metadata": st.dictionaries(st.text(max_size=5), json_values, max_size=3) | json_values,
}
finite_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
valid = {
    "job_id": st.from_regex(r"[A-Za-z0-9_-]{1,8}", fullmatch=True),
    "dataset": st.from_regex(r"[A-Za-z0-9_-]{1,8}", fullmatch=True),
    "negative_prompt": st.text(max_size=20) | st.none(),
    "adapter": st.from_regex(r"[a-z]{1,4}(/[a-z.]{1,4}){0,2}", fullmatch=True) | st.none(),
    "scale": st.floats(-8, 8),
    "seed": st.integers(0, 2**63 - 1),
    "steps": st.integers(1, 200),
    "guidance_scale": st.floats(0, 50),
    "width": st.integers(1, 512).map(lambda n: n * 8),
    "height": st.integers(1, 512).map(lambda n: n * 8),
    "priority": st.integers(0, 9),
    "output": st.sampled_from(["s3://bucket/p", "s3://my.bucket", "/out", "out/dir"]),
    "metadata": st.dictionaries(st.text(max_size=5), finite_json, max_size=3),
}
job_objects = (
    st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=30)}, optional=valid)
    | st.fixed_dictionaries({}, optional=plausible)
    | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), json_values, max_size=6)
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(obj=job_objects)
def test_any_json_object_validates_or_raises_the_schema_error(obj: dict) -> None:
    try:
        job = parse_job_line(json.dumps(obj))
    except JobValidationError as e:
        assert e.problems and all(isinstance(p, str) and p for p in e.problems)
        return
    wire = job.wire_dict()
    assert Job.model_validate(json.loads(json.dumps(wire, allow_nan=False))) == job


@settings(max_examples=200, deadline=None)
@given(line=st.text(max_size=40) | st.binary(max_size=40))
def test_any_line_parses_or_raises_the_schema_error(line: str | bytes) -> None:
    with contextlib.suppress(JobValidationError):
        parse_job_line(line)


def test_a_job_id_cannot_take_the_error_records_name() -> None:
    # Job "x.error"'s sidecar would be x.error.json: the error record of job "x".
    assert any("reserved for error records" in p for p in problems({"prompt": "p", "job_id": "x.error"}))
    assert validate_job({"prompt": "p", "job_id": "x.errors"}).job_id == "x.errors"
