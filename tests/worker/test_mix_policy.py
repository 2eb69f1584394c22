"""How many adapters a worker's calls may mix: what was asked for, else what pays on its device."""

from __future__ import annotations

import pytest
import torch

from producer.errors import SettingsError
from worker.settings import DEFAULT_MIX_ADAPTERS, WorkerSettings

# Devices are only named here, never used: the policy depends on the engine's device type alone.
CPU, GPU = torch.device("cpu"), torch.device("cuda")


def test_unset_a_cpu_worker_runs_one_adapter_a_call() -> None:
    # On a CPU a fuller call saves nothing (docs/performance.md, "When mixing pays").
    assert WorkerSettings().policy_on(CPU).mix_adapters == 1


def test_unset_a_gpu_worker_mixes() -> None:
    assert WorkerSettings().policy_on(GPU).mix_adapters == DEFAULT_MIX_ADAPTERS
    assert WorkerSettings(max_loras=2).policy_on(GPU).mix_adapters == 2, "never more than the resident slots"


def test_what_the_operator_sets_wins_within_the_engines_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMNI_MIX_ADAPTERS", "3")
    assert WorkerSettings.from_env().policy_on(CPU).mix_adapters == 3
    assert WorkerSettings.from_env(max_loras=2).policy_on(GPU).mix_adapters == 2
    compiled = WorkerSettings.from_env(compile="eager").policy_on(GPU)
    assert compiled.mix_adapters == 1, "a compiled denoiser never mixes"
    monkeypatch.setenv("OMNI_MIX_ADAPTERS", "0")
    with pytest.raises(SettingsError, match=r"OMNI_MIX_ADAPTERS.*got 0"):
        WorkerSettings.from_env()
