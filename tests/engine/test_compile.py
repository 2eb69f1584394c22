"""`Omni(compile=...)`: the denoiser is compiled once, and switching among many adapters of mixed
rank, at changing scales, through every tier, never compiles it again.

The "eager" backend runs dynamo's capture and guards, which decide recompilation, without
inductor's code generation, which this CPU-only machine would spend minutes on and which plays no
part in when a graph is compiled again.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from omni_engine.lora.request import LoRARequest

PROMPT, SEED = "a lighthouse at dusk", 11
RANKS = (2, 4, 8, 16)


def _pixels(omni, request=None, scale=1.0) -> np.ndarray:
    image = omni.generate(PROMPT, seed=SEED, lora_request=request, lora_scale=scale)[0].images[0]
    return np.asarray(image, dtype=np.int16)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_switching_twenty_adapters_of_mixed_rank_never_recompiles(
    omni_factory, make_adapter, fresh_dynamo, monkeypatch
):
    requests = [
        LoRARequest(f"style-{i:02d}", i + 1, str(make_adapter(f"style-{i:02d}", rank=RANKS[i % 4], seed=i)))
        for i in range(20)
    ]
    omni = omni_factory(compile="eager", max_loras=2, max_cpu_loras=4, max_lora_rank=16)
    eager = omni_factory(max_loras=2, max_cpu_loras=4, max_lora_rank=16)
    # Warm-up: the base model, then with LoRA layers on, then with them off.
    base = _pixels(omni)
    _pixels(omni, requests[0])
    assert np.array_equal(_pixels(omni), base)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1, "the denoiser was not compiled"
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)

    calls = [(r, s) for r, s in zip(requests, [1.0, 0.5, -0.7, 1.3] * 5, strict=True)]
    calls += [(requests[3], 0.25), (None, 1.0), (requests[17], 0.0), (requests[0], 1.0), (requests[19], 2.0)]
    calls += [(requests[19], -1.0), (requests[0], 0.5)]
    sources = []
    for request, scale in calls:
        output = omni.generate(PROMPT, seed=SEED, lora_request=request, lora_scale=scale)[0]
        sources.append(output.metadata["adapter_source"])
        ours = np.asarray(output.images[0], dtype=np.int16)
        theirs = _pixels(eager, request, scale)
        # Padding to max_lora_rank reorders sums: equal up to rounding, and the adapter applied.
        assert np.abs(ours - theirs).max() <= 1, (request and request.lora_name, scale)
        if request is not None and scale != 0.0:
            assert np.abs(ours - base).max() > 1, "the adapter changed nothing"

    assert counters["stats"]["unique_graphs"] == graphs, "switching compiled a new graph"
    assert {"disk", "host", "resident"} <= set(sources), "every tier was exercised"


def test_an_unknown_backend_is_refused_by_name(omni_factory):
    with pytest.raises(ValueError, match=r"compile must be None or a torch\.compile backend.*'fastest'"):
        omni_factory(compile="fastest")


def test_inductor_without_a_compiler_is_refused_when_the_engine_is_built(omni_factory, monkeypatch, tmp_path):
    # Else the first call fails, and every call after it: a worker would fail every job it takes.
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no g++ on it
    monkeypatch.delenv("CXX", raising=False)
    refused = r"compile='inductor' on cpu .* C\+\+ compiler, and none was found \(g\+\+"
    with pytest.raises(ValueError, match=refused):
        omni_factory(compile="inductor")
