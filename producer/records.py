"""The records written beside each image: the sidecar of a done job, the record of a failed one.

The worker writes them and `omni-batch status` reads them back, so both go through this module:
the statuses, the fields and the encoding are defined once. The sidecar holds the whole job, what
the engine reported (seed, adapter digest and source, model, versions, timings) and where it ran.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from producer.schema import Job


class JobStatus(StrEnum):
    """A record's `status`; a StrEnum, so it is written as the plain string."""

    OK = "ok"
    FAILED = "failed"


def sidecar(job: Job, metadata: Mapping[str, Any], timings: Mapping[str, float]) -> dict[str, Any]:
    """Everything needed to reproduce and audit the image, from the engine's output metadata."""
    lora = metadata.get("lora")
    return {
        "status": JobStatus.OK,
        "job": job.wire_dict(),
        "seed": metadata["seed"],
        "adapter": job.adapter,
        "adapter_sha256": lora["sha256"] if lora else None,
        "adapter_source": metadata["adapter_source"],
        "fused": metadata["fused"],
        "mixed": metadata.get("mixed", False),
        "model": metadata["model"],
        "width": metadata["width"],
        "height": metadata["height"],
        "steps": metadata["num_inference_steps"],
        "guidance_scale": metadata["guidance_scale"],
        "batch_size": metadata["batch_size"],
        "device": metadata["device"],
        "dtype": metadata["dtype"],
        "versions": metadata["versions"],
        "worker_host": socket.gethostname(),
        "timings": {**metadata["timings"], **timings},
    }


def error_record(job: Job | Mapping[str, Any], error: BaseException) -> dict[str, Any]:
    """The record of a job that failed for good; `job` is a raw dict when it was no valid job."""
    return {
        "status": JobStatus.FAILED,
        "job": job.wire_dict() if isinstance(job, Job) else dict(job),
        "error_type": type(error).__name__,
        "error": str(error),
        "worker_host": socket.gethostname(),
    }


def encode(record: Mapping[str, Any]) -> bytes:
    """The bytes stored: indented, sorted JSON, for people reading the bucket as much as for code."""
    return json.dumps(record, indent=2, sort_keys=True).encode()


def failure_reason(data: bytes | None) -> str | None:
    """`ErrorType: message` from a stored error record, or None when it cannot be read."""
    try:
        record = json.loads(data or b"")
        return f"{record['error_type']}: {record['error']}"
    except (ValueError, TypeError, KeyError):
        return None
