"""The job: one image to generate, its fields, defaults, limits and derived id and seed.

The producer and the worker validate with the same `Job.model_validate`, so a job sent by any
Celery client, with optional fields missing, gets the same defaults, the same derived `job_id`
and `seed`, and the same checks as one built here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Hashable, Mapping
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from producer import defaults as d
from producer.adapter_roots import adapter_name_problem
from producer.errors import JobValidationError
from producer.layout import name_problem
from producer.output_uri import parse_output_uri
from producer.redact import redact

# Fields that do not change the image or where it is stored, so they stay out of the derived id.
_NOT_IN_IDENTITY = frozenset({"job_id", "priority"})
_VALUE_REPR_CHARS = 60


def _utf8(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode ({e.reason})") from None
    return value


def _name(value: str) -> str:
    problem = name_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def _job_id(value: str) -> str:
    if value.endswith(".error"):
        # `<id>.error.json` is the error record of job `<id>`: the sidecar of this job would clash.
        raise ValueError("must not end with '.error' (reserved for error records)")
    return value


def _adapter(value: str) -> str:
    problem = adapter_name_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def _output(value: str) -> str:
    parse_output_uri(value)  # its InvalidStorageURIError is a ValueError: the reason pydantic reports
    return value


def _metadata(value: dict[str, Any]) -> dict[str, Any]:
    try:
        encoded = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except (TypeError, ValueError, RecursionError) as e:
        raise ValueError(f"must be plain JSON with finite numbers ({e})") from None
    if len(encoded) > d.MAX_METADATA_BYTES:
        raise ValueError(f"{len(encoded)} bytes as JSON; the limit is {d.MAX_METADATA_BYTES}")
    # Round-trip so the model holds exactly what travels on the wire (tuples become lists, ...).
    return json.loads(encoded)


# The patterns only document the characters in the JSON schema (the HTTP API's OpenAPI document);
# the validators enforce the whole rule with a readable reason.
Name = Annotated[
    str,
    Field(min_length=1, max_length=d.MAX_NAME_LENGTH, json_schema_extra={"pattern": "^[A-Za-z0-9._-]+$"}),
    AfterValidator(_name),
]
JobId = Annotated[Name, AfterValidator(_job_id)]
AdapterName = Annotated[
    str,
    Field(min_length=1, max_length=d.MAX_ADAPTER_LENGTH, json_schema_extra={"pattern": "^[A-Za-z0-9._/-]+$"}),
    AfterValidator(_adapter),
]
Size = Annotated[int, Field(ge=d.SIZE_MULTIPLE, le=d.MAX_SIZE, multiple_of=d.SIZE_MULTIPLE)]


class Job(BaseModel):
    """One image to generate. Validated strictly: no coercion, no bools as numbers, no NaN."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

    job_id: JobId | None = None
    dataset: Name = d.DEFAULT_DATASET
    prompt: Annotated[str, Field(min_length=1, max_length=d.MAX_PROMPT_LENGTH), AfterValidator(_utf8)]
    negative_prompt: Annotated[str, AfterValidator(_utf8)] | None = None
    adapter: AdapterName | None = None
    scale: Annotated[float, Field(ge=-d.MAX_ABS_SCALE, le=d.MAX_ABS_SCALE)] = 1.0
    seed: Annotated[int, Field(ge=0, le=d.MAX_SEED)] | None = None
    steps: Annotated[int, Field(ge=1, le=d.MAX_STEPS)] | None = None
    guidance_scale: Annotated[float, Field(ge=0, le=d.MAX_GUIDANCE_SCALE)] | None = None
    width: Size | None = None
    height: Size | None = None
    priority: Annotated[int, Field(ge=0, le=d.MAX_PRIORITY)] = d.DEFAULT_PRIORITY
    output: Annotated[str, Field(min_length=1), AfterValidator(_utf8), AfterValidator(_output)] | None = None
    metadata: Annotated[dict[str, Any], AfterValidator(_metadata)] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _derive_id_and_seed(self) -> Job:
        # The model is frozen so a job's id can never go stale; the derived values are filled in
        # once, here, before anyone sees the object.
        if self.job_id is None:
            identity = self.model_dump(mode="json", exclude=set(_NOT_IN_IDENTITY))
            object.__setattr__(self, "job_id", derive_job_id(identity))
        if self.seed is None:
            object.__setattr__(self, "seed", derive_seed(self.job_id))
        return self

    def wire_dict(self) -> dict[str, Any]:
        """The JSON-safe dict sent as the task's only argument: every field, derived ones filled in."""
        return self.model_dump(mode="json")

    def call_key(self) -> tuple[Hashable, ...]:
        """Jobs may share a pipeline call, whatever their adapters and scales, only when all of
        this is equal: a call that mixes adapters gives each prompt its own."""
        return (self.width, self.height, self.steps, self.guidance_scale, self.negative_prompt)

    def batch_key(self) -> tuple[Hashable, ...]:
        """Jobs of one adapter may share an unmixed (fusable) pipeline call only when all of this is equal."""
        return (*self.call_key(), self.scale)


def canonical_json(fields: Mapping[str, Any]) -> bytes:
    """Sorted-key, compact, UTF-8 JSON: the byte form that the derived job_id hashes."""
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def derive_job_id(identity: Mapping[str, Any]) -> str:
    """First 32 hex chars of sha256 over the canonical job (every field but job_id and priority)."""
    return hashlib.sha256(canonical_json(identity)).hexdigest()[: d.JOB_ID_HEX_CHARS]


def derive_seed(job_id: str) -> int:
    """A seed fixed by the job_id, so a job re-run anywhere draws the same image."""
    return int(hashlib.sha256(job_id.encode()).hexdigest()[:16], 16) & d.MAX_SEED


def _short(value: Any) -> str:
    text = redact(repr(value))
    return text if len(text) <= _VALUE_REPR_CHARS else text[: _VALUE_REPR_CHARS - 3] + "..."


def describe_error(error: Mapping[str, Any]) -> str:
    """One pydantic error as `field = value: reason` (or a missing / unknown field)."""
    field = ".".join(str(part) for part in error["loc"]) or "job"
    kind = error["type"]
    if kind == "missing":
        return f"{field}: required field is missing"
    if kind == "extra_forbidden":
        allowed = ", ".join(Job.model_fields)
        return f"{field}: unknown field (value {_short(error['input'])}); the fields are: {allowed}"
    if kind == "model_type":
        return f"a job must be a JSON object, not {type(error['input']).__name__}"
    reason = str(error["ctx"]["error"]) if kind == "value_error" else error["msg"]
    return f"{field} = {_short(error['input'])}: {reason}"


def validate_job(data: Any) -> Job:
    """`Job.model_validate`, with every violation reported in one `JobValidationError`."""
    try:
        return Job.model_validate(data)
    except ValidationError as e:
        raise JobValidationError([describe_error(err) for err in e.errors(include_url=False)]) from e


def load_json(text: str | bytes) -> Any:
    """`json.loads`, with every way it can fail reported as one JobValidationError."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = f"line {e.lineno} column {e.colno}" if e.lineno > 1 else f"column {e.colno}"
        raise JobValidationError([f"not valid JSON: {e.msg} at {where}"]) from e
    except (ValueError, RecursionError) as e:  # bad UTF-8, an int too long, nesting too deep
        raise JobValidationError([f"not valid JSON: {e}"]) from e


def parse_job_line(line: str | bytes, *, defaults: Mapping[str, Any] | None = None) -> Job:
    """Parse one JSONL line; `defaults` fill fields the line lacks. Raises only JobValidationError."""
    data = load_json(line)
    if not isinstance(data, dict):
        raise JobValidationError([f"a job must be a JSON object, not {type(data).__name__}"])
    if defaults:
        data = {**defaults, **data}
    return validate_job(data)
