"""How many adapters a worker's calls may mix: what was asked for, else what pays on its device."""

from __future__ import annotations

import pytest
import torch

from producer.errors import SettingsError
from worker.settings import DEFAULT_MIX_ADAPTERS, WorkerSettings


def test_unset_a_cpu_worker_runs_one_adapter_a_call() -> None:
    # This machine has no GPU: the engine runs on the CPU, where a fuller call saves nothing.
    assert not torch.cuda.is_available()
    assert WorkerSettings().policy.mix_adapters == 1


def test_unset_a_gpu_worker_mixes(monkeypatch: pytest.MonkeyPatch) -> None:
    # No GPU here: only the question the engine asks to pick its device is answered as on a GPU host.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert WorkerSettings().policy.mix_adapters == DEFAULT_MIX_ADAPTERS
    assert WorkerSettings(max_loras=2).policy.mix_adapters == 2, "never more than the resident slots"


def test_what_the_operator_sets_wins_within_the_engines_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMNI_MIX_ADAPTERS", "3")
    assert WorkerSettings.from_env().policy.mix_adapters == 3
    assert WorkerSettings.from_env(max_loras=2).policy.mix_adapters == 2
    assert WorkerSettings.from_env(compile="eager").policy.mix_adapters == 1, (
        "a compiled denoiser never mixes"
    )
    monkeypatch.setenv("OMNI_MIX_ADAPTERS", "0")
    with pytest.raises(SettingsError, match=r"OMNI_MIX_ADAPTERS.*got 0"):
        WorkerSettings.from_env()
