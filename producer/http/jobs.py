"""The queue over HTTP: submit jobs, ask for one job's outcome, count a dataset.

A posted batch goes through the same checks as a job file (`producer.schema`,
`producer.jobfile.JobCollector`): one bad job refuses the whole batch, every problem listed with
its index, and nothing is enqueued. Outcomes are read from the output storage, the record of truth.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from producer.errors import JobValidationError
from producer.http.errors import ApiError, responses
from producer.http.files import output_url
from producer.http.limits import too_large
from producer.http.state import ServerState, server
from producer.jobfile import JobCollector
from producer.layout import error_key, image_key, sidecar_key
from producer.progress import dataset_status
from producer.redact import redact_credentials
from producer.schema import Job, JobId, Name, load_json, validate_job

router = APIRouter(tags=["jobs"])

JOB_SCHEMA_REF = "#/components/schemas/Job"
_JOBS_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "oneOf": [
                    {"$ref": JOB_SCHEMA_REF},
                    {"type": "array", "items": {"$ref": JOB_SCHEMA_REF}, "minItems": 1},
                ]
            }
        }
    },
}


class JobState(StrEnum):
    QUEUED = "queued"
    DONE = "done"
    FAILED = "failed"


class JobRef(BaseModel):
    job_id: str
    dataset: str
    status_url: str


class JobsAccepted(BaseModel):
    jobs: list[JobRef]
    duplicates: int


class JobStatusResponse(BaseModel):
    job_id: str
    dataset: str
    status: JobState
    image_url: str | None = None
    sidecar_url: str | None = None
    error: dict[str, Any] | None = None


class DatasetCounts(BaseModel):
    dataset: str
    done: int
    failed: int
    pending: int | None
    failed_job_ids: list[str]


def job_ref(request: Request, job: Job) -> JobRef:
    url = request.url_for("get_job", dataset=job.dataset, job_id=job.job_id)
    return JobRef(job_id=job.job_id, dataset=job.dataset, status_url=str(url))


def check_jobs(state: ServerState, body: bytes) -> JobCollector:
    """Every job of a posted body (one job or a list), or ApiError listing every problem."""
    try:
        data = load_json(body)
    except JobValidationError as e:
        raise ApiError(400, f"the body is {e}", code="invalid_json") from e
    items, single = ([data], True) if isinstance(data, dict) else (data, False)
    if not isinstance(items, list) or not items:
        raise ApiError(422, "the body must be one job (a JSON object) or a non-empty list of jobs")
    if len(items) > state.config.max_jobs:
        raise too_large(f"the list of {len(items)} jobs", state.config.max_jobs, "jobs")
    batch = JobCollector()
    for index, item in enumerate(items):
        place = "job" if single else f"jobs[{index}]"
        try:
            job = validate_job(item)
        except JobValidationError as e:
            batch.reject(place, e.problems)
            continue
        if job.output is not None and job.output not in (state.storage.uri, state.config.output_uri):
            # The server answers for its own output only: a job written elsewhere could never be
            # reported done.
            reason = "this server reads results from its own output only; omit the field"
            batch.reject(place, [f"output = {job.output!r}: {reason}"])
            continue
        batch.add(place, job)
    if batch.problems:
        raise ApiError(
            422,
            f"{len(batch.bad_places)} bad job(s); nothing was enqueued: " + "; ".join(batch.problems[:5]),
            code="invalid_job",
            problems=batch.problems,
        )
    return batch


@router.post(
    "/v1/jobs",
    status_code=202,
    summary="Enqueue one job or a list of jobs, all or nothing",
    response_model=JobsAccepted,
    responses=responses(400, 401, 413, 422, 503),
    openapi_extra={"requestBody": _JOBS_BODY},
)
async def submit_jobs(request: Request) -> JobsAccepted:
    state = server(request)
    body = await request.body()
    batch = await run_in_threadpool(check_jobs, state, body)
    await run_in_threadpool(state.client.submit_many, batch.jobs)
    return JobsAccepted(jobs=[job_ref(request, job) for job in batch.jobs], duplicates=batch.duplicates)


def read_job_status(request: Request, dataset: str, job_id: str) -> JobStatusResponse:
    """Done (a sidecar), failed (an error record), else queued: as the output storage says."""
    storage = server(request).storage
    answer = JobStatusResponse(job_id=job_id, dataset=dataset, status=JobState.QUEUED)
    if storage.exists(sidecar_key(dataset, job_id)):
        answer.status = JobState.DONE
        answer.image_url = output_url(request, image_key(dataset, job_id))
        answer.sidecar_url = output_url(request, sidecar_key(dataset, job_id))
        return answer
    record = storage.get_bytes(error_key(dataset, job_id))
    if record is not None:
        answer.status = JobState.FAILED
        try:
            answer.error = redact_credentials(json.loads(record))
        except ValueError:
            answer.error = {"error": "the error record cannot be read"}
    return answer


@router.get(
    "/v1/jobs/{dataset}/{job_id}",
    name="get_job",
    summary="A job's outcome: queued (or unknown), done with its URLs, or failed with its error record",
    response_model=JobStatusResponse,
    response_model_exclude_none=True,
    responses=responses(401, 422, 502, 503),
)
def get_job(
    request: Request,
    dataset: Annotated[Name, Path(description="the job's dataset")],
    job_id: Annotated[JobId, Path(description="the job's id, as POST /v1/jobs answered it")],
) -> JobStatusResponse:
    return read_job_status(request, dataset, job_id)


@router.get(
    "/v1/datasets/{dataset}",
    summary="Count a dataset's done and failed jobs",
    response_model=DatasetCounts,
    responses=responses(401, 422, 502, 503),
)
def get_dataset(request: Request, dataset: Annotated[Name, Path(description="the dataset")]) -> DatasetCounts:
    status = dataset_status(server(request).storage, dataset)
    return DatasetCounts(
        dataset=dataset,
        done=status.done,
        failed=status.failed,
        pending=status.pending,
        failed_job_ids=list(status.failed_job_ids),
    )
