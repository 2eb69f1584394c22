"""`omni-batch adapters validate`, run as a user runs it: the installed console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

# The console script sits beside the interpreter running the tests (the project's venv).
OMNI_BATCH = Path(sys.executable).parent / "omni-batch"


def _validate(*args: str) -> subprocess.CompletedProcess:
    assert OMNI_BATCH.exists(), "the omni-batch console script is not installed"
    return subprocess.run(
        [str(OMNI_BATCH), "adapters", "validate", *args], capture_output=True, text=True, timeout=300
    )


def test_validate_reports_what_a_good_adapter_targets(make_adapter):
    path = make_adapter("good", rank=8, targets=("to_q", "to_v"))
    result = _validate(str(path), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["rank"] == 8 and report["model"] == "tiny-sd3"
    assert report["targets"] == {"attn.to_q": 1, "attn.to_v": 1}


def test_validate_a_bad_adapter_exits_2_with_the_reason(make_adapter):
    path = make_adapter("bad")
    (path / "adapter_model.safetensors").write_bytes(b"\x00" * 3)
    result = _validate(str(path))
    assert result.returncode == 2
    assert "bad" in result.stderr and "too short" in result.stderr
