"""`omni-batch adapters validate`, run as a user runs it: the installed console script."""

from __future__ import annotations

import json
import subprocess

from fixtures.command_process import OMNI_BATCH


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


def test_validate_says_how_a_file_without_config_was_read(tmp_path):
    """A weights file named directly, with diffusers keys and no config anywhere: alpha = r, said."""
    import torch
    from safetensors.torch import save_file

    weights = tmp_path / "bare.safetensors"
    module = "transformer_blocks.0.attn.to_q"  # a tiny-sd3 layer, 32 x 32
    save_file(
        {f"{module}.lora_A.weight": torch.ones(2, 32), f"{module}.lora_B.weight": torch.ones(32, 2)}, weights
    )
    result = _validate(str(weights), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["rank"] == 2 and report["lora_alpha"] == 2
    assert any("lora_alpha = r" in note for note in report["notes"])
