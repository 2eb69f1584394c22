"""`POST /v1/images/generations`: OpenAI's images API, with vLLM-Omni's `lora` object.

Each request becomes `n` ordinary jobs at the highest priority in the server's images dataset.
The answer is the images once they are stored, if that happens within the wait (the server's
default, or the request's `Prefer: wait=N`, RFC 7240); else 202 with the jobs' status URLs.
An OpenAI client library works unchanged; extensions go in its `extra_body`.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import secrets
import time
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from producer import defaults as d
from producer.errors import JobValidationError
from producer.http.config import MAX_WAIT_S
from producer.http.errors import ApiError, responses
from producer.http.files import output_url
from producer.http.jobs import JobRef, job_ref
from producer.http.state import ServerState, server
from producer.layout import error_key, image_key, sidecar_key
from producer.records import failure_reason
from producer.schema import Job, validate_job

router = APIRouter(tags=["images"])

MAX_IMAGES = 10  # OpenAI's own bound on `n`
_SIZE_PATTERN = r"^(auto|\d{1,5}x\d{1,5})$"
_PREFER_WAIT_RE = re.compile(r"(?:^|[,;\s])wait\s*=\s*(\d+(?:\.\d+)?)", re.IGNORECASE)
# Storage is polled from this interval up to the next, growing by half each time.
_POLL_FIRST_S = 0.05
_POLL_MAX_S = 0.5
# Failures that are the request's fault (an adapter that is missing, bad or outside the roots).
_CLIENT_ERRORS = frozenset(
    {
        "AdapterNotFoundError",
        "InvalidAdapterError",
        "IncompatibleAdapterError",
        "AdapterAccessError",
        "JobValidationError",
    }
)
# Job fields as the request names them, for messages.
_REQUEST_FIELDS = {
    "steps": "num_inference_steps",
    "adapter": "lora.local_path",
    "scale": "lora.scale",
    "width": "size",
    "height": "size",
}


class LoraSpec(BaseModel):
    """vLLM-Omni's per-request LoRA: the adapter's directory on the server, and its scale."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str | None = Field(None, description="a label; the adapter is named by its path")
    local_path: str | None = Field(
        None,
        description="the adapter's directory under the worker's adapter roots (absolute), "
        "or its name relative to them",
    )
    path: str | None = Field(None, description="the same as local_path")
    scale: float = Field(1.0, ge=-d.MAX_ABS_SCALE, le=d.MAX_ABS_SCALE, allow_inf_nan=False)
    int_id: int | None = Field(None, description="accepted and unused: adapters are identified by content")


class ImageGenerationRequest(BaseModel):
    """OpenAI's images request, plus vLLM-Omni's extensions (seed, steps, guidance, lora)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=d.MAX_PROMPT_LENGTH)
    model: str | None = Field(None, description="accepted for compatibility: the workers' model answers")
    n: int = Field(1, ge=1, le=MAX_IMAGES)
    size: str | None = Field(
        None, pattern=_SIZE_PATTERN, description="`WIDTHxHEIGHT` (multiples of 8) or `auto` (the model's)"
    )
    response_format: Literal["b64_json", "url"] = "b64_json"
    user: str | None = Field(None, description="accepted and unused")
    negative_prompt: str | None = Field(None, min_length=1, max_length=d.MAX_PROMPT_LENGTH)
    seed: int | None = Field(None, ge=0, le=d.MAX_SEED, description="image i uses seed + i; default: random")
    num_inference_steps: int | None = Field(None, ge=1, le=d.MAX_STEPS)
    guidance_scale: float | None = Field(None, ge=0, le=d.MAX_GUIDANCE_SCALE, allow_inf_nan=False)
    lora: LoraSpec | None = None


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    """OpenAI's answer; `data` is empty in a 202, and `jobs` says where each image's status is."""

    created: int
    data: list[ImageData]
    jobs: list[JobRef]


def adapter_name(lora: LoraSpec, roots: tuple[str, ...]) -> str:
    """The adapter name (relative to the roots) that `lora`'s path points to, or ApiError."""
    param = "lora.local_path" if lora.local_path is not None else "lora.path"
    path = lora.local_path or lora.path
    if lora.local_path and lora.path and lora.local_path != lora.path:
        raise ApiError(422, "lora: local_path and path differ; give one of them", param="lora.path")
    if not path:
        raise ApiError(
            422,
            "lora: give local_path (or path): the adapter's directory under the adapter roots",
            param=param,
        )
    if not os.path.isabs(path):
        return path  # a name relative to the roots: the job schema checks it (no '..', no '//')
    if not roots:
        raise ApiError(
            422,
            f"{param} = {path!r}: this server has no adapter roots to resolve an absolute path under "
            "(set OMNI_ADAPTER_ROOTS or --adapter-root); give the adapter's name relative to the roots",
            param=param,
        )
    # Lexically: the server need not see the workers' files. The worker resolves the name again
    # under its own roots, symlinks included, and refuses anything outside them.
    target = os.path.normpath(path)
    for root in roots:
        for form in dict.fromkeys((os.path.normpath(root), os.path.realpath(root))):
            if target.startswith(form.rstrip(os.sep) + os.sep):
                return os.path.relpath(target, form).replace(os.sep, "/")
    raise ApiError(
        422, f"{param} = {path!r} is not under the adapter roots ({len(roots)} configured)", param=param
    )


def _size(size: str | None) -> dict[str, int]:
    if size in (None, "auto"):
        return {}
    width, _, height = size.partition("x")  # the request's pattern has checked the form
    return {"width": int(width), "height": int(height)}


def _request_field(problem: str) -> str:
    field, _, rest = problem.partition(" ")
    field = field.rstrip(":")
    return f"{_REQUEST_FIELDS.get(field, field)} {rest}" if rest else problem


def build_jobs(request: ImageGenerationRequest, state: ServerState) -> list[Job]:
    """The request's `n` jobs, checked as any job is; ApiError naming the request's field if not."""
    first_seed = request.seed if request.seed is not None else secrets.randbelow(d.MAX_SEED + 1 - MAX_IMAGES)
    fields = {
        "dataset": state.config.images_dataset,
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "steps": request.num_inference_steps,
        "guidance_scale": request.guidance_scale,
        "priority": d.MAX_PRIORITY,
        **_size(request.size),
    }
    if request.lora is not None:
        fields |= {
            "adapter": adapter_name(request.lora, state.config.adapter_roots),
            "scale": request.lora.scale,
        }
    try:
        return [validate_job({**fields, "seed": first_seed + i}) for i in range(request.n)]
    except JobValidationError as e:
        problems = [_request_field(problem) for problem in e.problems]
        raise ApiError(422, "; ".join(problems), code="invalid_value", problems=problems) from e


def prefer_wait(prefer: str | None, default: float) -> float:
    """The wait the client asked for with `Prefer: wait=N` (capped), else the server's default."""
    match = _PREFER_WAIT_RE.search(prefer or "")
    return min(float(match.group(1)), MAX_WAIT_S) if match else default


def error_records(state: ServerState, jobs: list[Job]) -> dict[str, bytes]:
    """The error records the jobs have before they are sent: an earlier try's, not this one's."""
    records = {job.job_id: state.storage.get_bytes(error_key(job.dataset, job.job_id)) for job in jobs}
    return {job_id: record for job_id, record in records.items() if record is not None}


def _settle(
    state: ServerState, jobs: list[Job], outcomes: dict[str, str | None], earlier: dict[str, bytes]
) -> None:
    """Fill `outcomes[job_id]` (None: done; else the failure) for the jobs that now have an outcome.

    A sidecar means done whatever else is there; an error record counts once it is not the one
    an earlier try left (a failure with the very same record is seen when the wait ends).
    """
    for job in jobs:
        if job.job_id in outcomes:
            continue
        if state.storage.exists(sidecar_key(job.dataset, job.job_id)):
            outcomes[job.job_id] = None
            continue
        record = state.storage.get_bytes(error_key(job.dataset, job.job_id))
        if record is not None and record != earlier.get(job.job_id):
            outcomes[job.job_id] = failure_reason(record) or "the error record cannot be read"


async def wait_for(
    state: ServerState, jobs: list[Job], wait_s: float, *, earlier: dict[str, bytes]
) -> dict[str, str | None]:
    """Each settled job's outcome (None: done; else the failure), polling until all or the wait ends."""
    deadline = time.monotonic() + wait_s
    outcomes: dict[str, str | None] = {}
    interval = _POLL_FIRST_S
    while True:
        await run_in_threadpool(_settle, state, jobs, outcomes, earlier)
        remaining = deadline - time.monotonic()
        if len(outcomes) == len(jobs) or remaining <= 0:
            return outcomes
        await asyncio.sleep(min(interval, remaining))
        interval = min(interval * 1.5, _POLL_MAX_S)


def _failure(job: Job, reason: str, status_url: str) -> ApiError:
    error_type = reason.partition(":")[0]
    client_fault = error_type in _CLIENT_ERRORS
    return ApiError(
        422 if client_fault else 500,
        f"job {job.job_id} failed: {reason} (record: {status_url})",
        type="invalid_request_error" if client_fault else "server_error",
        code="job_failed",
    )


def _image(request: Request, state: ServerState, job: Job, response_format: str) -> ImageData:
    key = image_key(job.dataset, job.job_id)
    if response_format == "url":
        return ImageData(url=output_url(request, key))
    data = state.storage.get_bytes(key)
    if data is None:  # a sidecar is written after its image, so this is someone deleting outputs
        raise ApiError(
            502, f"job {job.job_id} is done but its image is gone from the output", type="server_error"
        )
    return ImageData(b64_json=base64.b64encode(data).decode())


@router.post(
    "/v1/images/generations",
    summary="Generate images (OpenAI-compatible), with an optional LoRA adapter",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses={
        202: {"model": ImagesResponse, "description": "Not ready within the wait: the jobs' status URLs"},
        **responses(400, 401, 413, 422, 500, 502, 503),
    },
)
async def generate_images(
    body: ImageGenerationRequest,
    request: Request,
    response: Response,
    prefer: Annotated[
        str | None,
        Header(description=f"`wait=N`: seconds to wait for the images (at most {MAX_WAIT_S:g}) before a 202"),
    ] = None,
) -> ImagesResponse:
    state = server(request)
    jobs = build_jobs(body, state)
    earlier = await run_in_threadpool(error_records, state, jobs)
    await run_in_threadpool(state.client.submit_many, jobs)
    refs = [job_ref(request, job) for job in jobs]
    outcomes = await wait_for(state, jobs, prefer_wait(prefer, state.config.wait_s), earlier=earlier)
    for job, ref in zip(jobs, refs, strict=True):
        reason = outcomes.get(job.job_id)
        if reason is not None:
            raise _failure(job, reason, ref.status_url)
    created = int(time.time())
    if len(outcomes) < len(jobs):
        response.status_code = 202
        response.headers["Location"] = refs[0].status_url
        return ImagesResponse(created=created, data=[], jobs=refs)
    data = await run_in_threadpool(
        lambda: [_image(request, state, job, body.response_format) for job in jobs]
    )
    return ImagesResponse(created=created, data=data, jobs=refs)
