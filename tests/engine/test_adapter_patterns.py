"""rank_pattern and alpha_pattern keys mean what they mean to PEFT; keys PEFT could stall on are refused."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.engine import peft_reference
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.utils.other import get_pattern_key

from omni_engine.errors import InvalidAdapterError
from omni_engine.lora.config import MAX_PATTERN_KEYS, AdapterConfig, pattern_matches
from omni_engine.lora.request import LoRARequest

PROMPT, SEED = "a small house by a lake", 21
CONFIG = "adapter_config.json"


# -- the matching rule, against PEFT's own function -----------------------------------------------

# Few characters, so that keys and module paths collide often; "\n" because `$` and `.` treat it apart.
KEY_CHARS = "ab._-"
keys = st.builds(
    lambda anchor, body: anchor + body, st.sampled_from(["", "^"]), st.text(KEY_CHARS, min_size=1, max_size=6)
)
modules = st.text(KEY_CHARS + "\n", max_size=10)


@settings(max_examples=3000, deadline=None)
@given(key=keys, module=modules)
def test_a_key_matches_exactly_where_peft_matches_it(key, module):
    # get_pattern_key returns the module itself when no key matches, so a module equal to the key
    # reads as a match there: ask the regex PEFT uses for that case.
    peft = get_pattern_key([key], module) == key
    if key == module:
        peft = bool(re.match(rf"(.*\.)?({key})$", module))
    assert pattern_matches(key, module) == peft


@settings(max_examples=500, deadline=None)
@given(pattern=st.dictionaries(keys, st.integers(1, 64), max_size=5), module=modules)
def test_the_first_matching_key_decides_as_in_peft(pattern, module):
    config = AdapterConfig(r=99, lora_alpha=1.0, rank_pattern=pattern)
    expected = pattern.get(get_pattern_key(pattern.keys(), module), 99)
    if module in pattern and not any(re.match(rf"(.*\.)?({k})$", module) for k in pattern):
        expected = 99  # get_pattern_key's fallback is the module name itself, a key here by chance
    assert config.rank_for(module) == expected


def test_wildcards_anchors_and_suffixes_on_real_module_paths():
    config = AdapterConfig(
        r=4,
        lora_alpha=4,
        alpha_pattern={"^transformer_blocks.0.attn.to_k": 1.0, "to_.": 2.0, "to_out.0": 3.0},
    )
    assert config.alpha_for("transformer_blocks.0.attn.to_q") == 2.0  # `.` is a wildcard, as in PEFT
    assert config.alpha_for("transformer_blocks.0.attn.to_k") == 1.0  # first key that matches wins
    assert config.alpha_for("transformer_blocks.0.attn.to_out.0") == 3.0  # a literal path suffix
    assert config.alpha_for("transformer_blocks.0.attn.add_q_proj") == 4.0
    assert config.alpha_for("transformer_blocks.0.attn.xto_q") == 4.0  # whole path segments only
    assert config.alpha_for("blocks.transformer_blocks.0.attn.to_k") == 2.0  # `^`: the whole path


# -- what is refused --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "shown"),
    [
        ("to_(q|k)", "'()|'"),
        ("to_.*", "'*'"),
        ("to_q+", "'+'"),
        ("to_[qk]", "'[]'"),
        ("to_q$", "'$'"),
        ("a^b", "'^'"),
        (r"to\.q", "'\\\\'"),
        ("to_q{1,9}", "',{}'"),
        ("^", "empty"),
        ("", "empty"),
    ],
)
@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_keys_with_regex_operators_are_refused_naming_the_key(field, key, shown):
    with pytest.raises(InvalidAdapterError) as caught:
        AdapterConfig.from_dict({"r": 4, "lora_alpha": 4, field: {key: 2}}, adapter="hostile", source=CONFIG)
    message = str(caught.value)
    assert "hostile" in message and field in message and repr(key) in message and shown in message, message


def test_too_many_keys_are_refused():
    pattern = {f"m{i}": 2 for i in range(MAX_PATTERN_KEYS + 1)}
    with pytest.raises(InvalidAdapterError, match=f"at most {MAX_PATTERN_KEYS}"):
        AdapterConfig.from_dict({"r": 4, "alpha_pattern": pattern}, adapter="x", source=CONFIG)


def test_the_worst_accepted_config_is_matched_in_bounded_time():
    # The most keys, each all wildcards, against long dotted paths: PEFT's regex backtracks over every
    # dot for every key (minutes here); the matcher looks at each path's tail once per key.
    pattern = {"." * 500 + f"{i:04d}": 2 for i in range(MAX_PATTERN_KEYS)}
    config = AdapterConfig.from_dict({"r": 4, "rank_pattern": pattern}, adapter="x", source=CONFIG)
    paths = ["a." * 500 + f"m{i}" for i in range(50)]
    started = time.perf_counter()
    assert all(config.rank_for(path) == 4 for path in paths)
    assert time.perf_counter() - started < 20


def test_only_deciding_keys_reach_peft():
    config = AdapterConfig(r=4, lora_alpha=4, alpha_pattern={"to_q": 1.0, "to_.": 2.0, "proj_out": 3.0})
    kwargs = config.peft_kwargs(["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v"])
    assert kwargs["alpha_pattern"] == {"to_q": 1.0, "to_.": 2.0}  # unescaped, in their order


# -- images, against PEFT's own PeftModel -----------------------------------------------------------


def _peft_reference(adapter_dir: Path) -> np.ndarray:
    return peft_reference(adapter_dir, PROMPT, SEED)


def _ours(omni_factory, adapter_dir: Path) -> np.ndarray:
    request = LoRARequest("x", 1, str(adapter_dir))
    output = omni_factory().generate(PROMPT, seed=SEED, lora_request=request)[0]
    return np.asarray(output.images[0], dtype=np.int16)


def _set_config(path: Path, **updates) -> Path:
    config = json.loads((path / CONFIG).read_text())
    config.update(updates)
    (path / CONFIG).write_text(json.dumps(config))
    return path


def _write_rank_pattern_adapter(path: Path, model, *, rank_pattern: dict[str, int]) -> Path:
    """A real PEFT adapter whose modules have the ranks PEFT itself gives them under rank_pattern."""
    import copy

    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=4,
        lora_alpha=4,
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        rank_pattern=rank_pattern,
        init_lora_weights=False,
    )
    peft_model = get_peft_model(copy.deepcopy(model), config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 2.0 / param.shape[1] ** 0.5)
    peft_model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.mark.parametrize(
    "alpha_pattern",
    [{"to_.": 16}, {"to_q": 0.5, "attn.to_out.0": 12}, {"^transformer_blocks.0.attn.to_k": 20}],
    ids=["wildcard", "literal-suffix", "anchored"],
)
def test_alpha_pattern_gives_peftmodels_image(omni_factory, make_adapter, alpha_pattern):
    plain = make_adapter("plain", rank=4, alpha=4, seed=99)
    patterned = _set_config(make_adapter("patterned", rank=4, alpha=4, seed=99), alpha_pattern=alpha_pattern)

    ours = _ours(omni_factory, patterned)
    assert np.abs(ours - _peft_reference(patterned)).max() <= 1
    assert np.abs(ours - _ours(omni_factory, plain)).max() > 2, "the pattern should change the image"


def test_alpha_pattern_in_a_diffusers_header_gives_peftmodels_image(omni_factory, make_adapter):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    reference = _set_config(make_adapter("reference", rank=4, alpha=4, seed=99), alpha_pattern={"to_.": 16})
    ours_dir = make_adapter("ours", layout="diffusers", rank=4, alpha=4, seed=99)
    weights = ours_dir / "pytorch_lora_weights.safetensors"
    with safe_open(str(weights), "pt") as f:
        metadata = f.metadata()
    header = json.loads(metadata["lora_adapter_metadata"])
    header["alpha_pattern"] = {"to_.": 16}
    save_file(load_file(weights), weights, metadata={**metadata, "lora_adapter_metadata": json.dumps(header)})

    assert np.abs(_ours(omni_factory, ours_dir) - _peft_reference(reference)).max() <= 1


def test_rank_pattern_with_a_wildcard_gives_peftmodels_image(omni_factory, tiny_transformer, tmp_path):
    from safetensors.torch import load_file

    path = _write_rank_pattern_adapter(tmp_path / "ranked", tiny_transformer, rank_pattern={"to_.": 2})
    # PEFT read the wildcard: q, k and v have rank 2, to_out.0 keeps r=4; a literal reading would refuse.
    ranks = {k: v.shape[0] for k, v in load_file(path / "adapter_model.safetensors").items() if "lora_A" in k}
    assert sorted(set(ranks.values())) == [2, 4]

    assert np.abs(_ours(omni_factory, path) - _peft_reference(path)).max() <= 1
