"""Where the adapter of a call came from: a StrEnum, so metadata and sidecars carry plain strings."""

from __future__ import annotations

import json

from omni_engine.lora.source import AdapterSource


def test_adapter_sources_serialise_as_the_documented_strings() -> None:
    assert [str(source) for source in AdapterSource] == ["disk", "host", "resident"]
    assert json.dumps({"adapter_source": AdapterSource.DISK}) == '{"adapter_source": "disk"}'
    assert AdapterSource("host") is AdapterSource.HOST
