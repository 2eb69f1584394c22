"""Reading a safetensors file defensively: the header is checked before any tensor is built.

The file is read once, so the digest and the tensors come from the same bytes even if the
file changes underneath us.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from omni_engine.errors import InvalidAdapterError
from omni_engine.lora.paths import read_capped

MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPE_SIZES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}


@dataclass(frozen=True)
class SafetensorsFile:
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    sha256: str
    nbytes: int


def read_safetensors(path: Path, *, adapter: str, max_bytes: int) -> SafetensorsFile:
    """Parse, check and load a safetensors file; any defect is an InvalidAdapterError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    data = read_capped(path, max_bytes, adapter=adapter)
    metadata = _check_layout(data, path=path, adapter=adapter)
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise InvalidAdapterError(adapter, f"{path.name} is not a valid safetensors file: {e}") from e

    bad = sorted(name for name, tensor in tensors.items() if not torch.isfinite(tensor).all())
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise InvalidAdapterError(adapter, f"{path.name} has NaN or infinite values in {shown}")
    return SafetensorsFile(tensors, metadata, hashlib.sha256(data).hexdigest(), len(data))


def _check_layout(data: bytes, *, path: Path, adapter: str) -> dict[str, str]:
    """Check that the header is JSON and that its offsets tile the data exactly, then return metadata."""

    def fail(reason: str) -> InvalidAdapterError:
        return InvalidAdapterError(adapter, f"{path.name} is not a valid safetensors file: {reason}")

    if len(data) < 8:
        raise fail(f"{len(data)} bytes is too short (truncated?)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(MAX_HEADER_BYTES, len(data) - 8):
        raise fail(
            f"header claims {header_len} bytes but the file has {len(data) - 8} (truncated or corrupt)"
        )
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, huge ints, deep nesting
        raise fail(f"header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise fail("header is not a JSON object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise fail("__metadata__ must map strings to strings")

    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise fail(f"entry {name!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise fail(
                f"tensor {name!r} has dtype {dtype!r}; LoRA weights must be one of {sorted(DTYPE_SIZES)}"
            )
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise fail(f"tensor {name!r} has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise fail(f"tensor {name!r} has invalid data_offsets {offsets!r}")
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if offsets[1] - offsets[0] != expected:
            raise fail(
                f"tensor {name!r} spans {offsets[1] - offsets[0]} bytes but {dtype}{shape} needs {expected}"
            )
        spans.append((offsets[0], offsets[1], name))

    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise fail(
                f"tensor {name!r} starts at byte {begin}, expected {position} (overlapping or gapped data)"
            )
        position = end
    body = len(data) - 8 - header_len
    if position != body:
        raise fail(f"tensors cover {position} bytes but the file holds {body} after the header (truncated?)")
    return metadata
