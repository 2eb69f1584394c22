"""Our LoRA application must give the image PEFT's own PeftModel gives for the same adapter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omni_engine.lora.request import LoRARequest
from omni_engine.models.loader import load_model

PROMPT, SEED = "a small house by a lake", 21


def _peft_reference(adapter_dir) -> np.ndarray:
    from peft import PeftModel

    model = load_model("tiny-sd3", device=torch.device("cpu"), dtype=torch.float32)
    model.pipeline.transformer = PeftModel.from_pretrained(model.pipeline.transformer, str(adapter_dir))
    image = model.pipeline(
        PROMPT,
        num_inference_steps=2,
        guidance_scale=5.0,
        height=32,
        width=32,
        generator=[torch.Generator().manual_seed(SEED)],
    ).images[0]
    return np.asarray(image, dtype=np.int16)


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
    reference = _peft_reference(reference_dir)

    assert np.abs(ours - base).max() > 8, "the adapter should visibly change the image"
    assert np.abs(ours - reference).max() <= 1
