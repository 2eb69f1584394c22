"""Where the adapter of one `generate` call came from: the sidecar's `adapter_source`.

`DISK` whenever the engine read the adapter's files to serve the call, so counting calls whose
source is `DISK` counts adapter reads; `HOST` from host memory, `RESIDENT` already in the model.
A StrEnum, so metadata and sidecars carry the plain strings.
"""

from __future__ import annotations

from enum import StrEnum


class AdapterSource(StrEnum):
    DISK = "disk"
    HOST = "host"
    RESIDENT = "resident"
