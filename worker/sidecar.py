"""The records written beside each image: the sidecar of a done job, the record of a failed one."""

from __future__ import annotations

import json
import socket
from typing import Any

from producer.schema import Job

STATUS_OK = "ok"
STATUS_FAILED = "failed"


def sidecar(job: Job, metadata: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
    """Everything needed to reproduce and audit the image (CONTRACT section 4)."""
    lora = metadata.get("lora")
    return {
        "status": STATUS_OK,
        "job": job.wire_dict(),
        "seed": metadata["seed"],
        "adapter": job.adapter,
        "adapter_sha256": lora["sha256"] if lora else None,
        "adapter_source": metadata["adapter_source"],
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


def error_record(job: Job | dict[str, Any], error: BaseException) -> dict[str, Any]:
    return {
        "status": STATUS_FAILED,
        "job": job.wire_dict() if isinstance(job, Job) else job,
        "error_type": type(error).__name__,
        "error": str(error),
        "worker_host": socket.gethostname(),
    }


def encode(record: dict[str, Any]) -> bytes:
    return json.dumps(record, indent=2, sort_keys=True).encode()
