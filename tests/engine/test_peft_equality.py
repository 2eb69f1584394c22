"""Our LoRA application must give the image PEFT's own PeftModel gives for the same adapter."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures.engine import TINY_MODELS, peft_reference

from omni_engine.lora.request import LoRARequest

PROMPT, SEED = "a small house by a lake", 21


CASES = {
    "alpha=r": {"rank": 4},
    "alpha=4r": {"rank": 8, "alpha": 32},
    "rslora": {"rank": 8, "alpha": 4, "use_rslora": True},
    "mixed-targets": {"rank": 2, "alpha": 7, "targets": ("to_q", "to_v", "proj_out", "ff.net.2")},
}
# Every case on SD3; on SDXL's UNet and Flux's transformer, the one that reaches most layer kinds.
MODEL_CASES = [("tiny-sd3", case) for case in CASES] + [
    (model, "mixed-targets") for model in TINY_MODELS if model != "tiny-sd3"
]


@pytest.mark.parametrize(("tiny_model", "case"), MODEL_CASES)
@pytest.mark.parametrize("layout", ["peft", "diffusers"])
def test_image_equals_peftmodel(omni_factory, make_adapter, tiny_model, case, layout):
    ours_dir = make_adapter(f"ours-{layout}", layout=layout, seed=99, **CASES[case])
    # The reference always reads the PEFT layout: PeftModel cannot read diffusers keys. Same seed,
    # same weights.
    reference_dir = make_adapter("reference", layout="peft", seed=99, **CASES[case])

    omni = omni_factory()
    base = np.asarray(omni.generate(PROMPT, seed=SEED)[0].images[0], dtype=np.int16)
    request = LoRARequest("x", 1, str(ours_dir))
    ours = np.asarray(omni.generate(PROMPT, seed=SEED, lora_request=request)[0].images[0], dtype=np.int16)
    reference = peft_reference(reference_dir, PROMPT, SEED, model=tiny_model)

    assert np.abs(ours - base).max() > 8, "the adapter should visibly change the image"
    assert np.abs(ours - reference).max() <= 1
