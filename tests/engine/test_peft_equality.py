"""Our LoRA application must give the image PEFT's own PeftModel gives for the same adapter."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures.engine import peft_reference

from omni_engine.lora.request import LoRARequest

PROMPT, SEED = "a small house by a lake", 21


@pytest.mark.parametrize(
    "adapter_kwargs",
    [
        {"rank": 4},
        {"rank": 8, "alpha": 32},
        {"rank": 8, "alpha": 4, "use_rslora": True},
        {"rank": 2, "alpha": 7, "targets": ("to_q", "to_v", "proj_out", "ff.net.2")},
    ],
    ids=["alpha=r", "alpha=4r", "rslora", "mixed-targets"],
)
@pytest.mark.parametrize("layout", ["peft", "diffusers"])
def test_image_equals_peftmodel(omni_factory, make_adapter, adapter_kwargs, layout):
    ours_dir = make_adapter(f"ours-{layout}", layout=layout, seed=99, **adapter_kwargs)
    # The reference always reads the PEFT layout: PeftModel cannot read diffusers keys. Same seed,
    # same weights.
    reference_dir = make_adapter("reference", layout="peft", seed=99, **adapter_kwargs)

    omni = omni_factory()
    base = np.asarray(omni.generate(PROMPT, seed=SEED)[0].images[0], dtype=np.int16)
    request = LoRARequest("x", 1, str(ours_dir))
    ours = np.asarray(omni.generate(PROMPT, seed=SEED, lora_request=request)[0].images[0], dtype=np.int16)
    reference = peft_reference(reference_dir, PROMPT, SEED)

    assert np.abs(ours - base).max() > 8, "the adapter should visibly change the image"
    assert np.abs(ours - reference).max() <= 1
