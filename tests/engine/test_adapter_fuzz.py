"""Fuzzing the adapter validator: whatever bytes an adapter directory holds, the engine's two checks
before any load (`read_adapter`, then `check_compatible` against the model's layers) give a sound
adapter or raise `AdapterError`; never another exception, never a hang, and never an accepted adapter
the engine could not use (no weights, non-finite weights or alpha, shapes that disagree with the ranks).

Every example starts from a real, good PEFT adapter for the tiny model and damages it: raw bytes
(bit flips, truncation, a random length prefix, random tensor data), the safetensors header (random
JSON, or well-formed files with renamed, reshaped, retyped, dropped or added tensors and random
metadata, in both the PEFT and the diffusers layout), and adapter_config.json (random JSON values for
the keys that matter, or random bytes). Hypothesis is bounded and derandomized, so a run is
repeatable; the specific inputs that found bugs are pinned as explicit cases below.
"""

from __future__ import annotations

import copy
import json
import math
import random
import resource
import struct
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omni_engine.errors import AdapterError
from omni_engine.lora.adapter import DIFFUSERS_METADATA_KEY, LoRAAdapter, read_adapter
from omni_engine.lora.formats import LORA_SUFFIXES
from omni_engine.lora.layers import LayerShape, adaptable_layers, check_compatible

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
COMPONENT = "transformer"
MAX_RANK = 256  # Omni's default max_lora_rank
DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I32": 4, "I64": 8, "BOOL": 1}

FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# A hang shows as a timeout, not as a stuck CI job.
pytestmark = pytest.mark.timeout(300)


class _ShortRepr:
    """Hypothesis's pretty-printer would show every byte of every field: it gets the short repr."""

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(repr(self))


@dataclass(frozen=True, repr=False)
class Tensor(_ShortRepr):
    name: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes

    def __repr__(self) -> str:
        return f"Tensor({self.name!r}, {self.dtype}{list(self.shape)})"


@dataclass(frozen=True, repr=False)
class GoodAdapter(_ShortRepr):
    config: dict[str, Any]
    weights: bytes
    header: dict[str, Any]
    body: bytes
    tensors: tuple[Tensor, ...]
    layers: dict[str, LayerShape]  # what the tiny model offers LoRA

    def __repr__(self) -> str:
        return f"GoodAdapter({len(self.tensors)} tensors, {len(self.weights)} bytes)"


@dataclass(frozen=True, repr=False)
class Sample(_ShortRepr):
    """One adapter directory to try; shown by what was done to the good one, not by its bytes."""

    config: bytes | None
    weights: bytes
    weights_name: str
    steps: tuple[str, ...]
    must_fail: bool = False  # damage no valid adapter survives (truncation, NaN or inf weights)

    def __repr__(self) -> str:
        return f"Sample({self.weights_name}, {len(self.weights)} bytes, steps={list(self.steps)!r})"

    def check(self, layers: dict[str, LayerShape]) -> None:
        adapter = _read_checked(self.config, self.weights, layers, weights_name=self.weights_name)
        assert not (self.must_fail and adapter is not None), f"accepted: {self!r}"


def _split(weights: bytes) -> tuple[dict[str, Any], bytes]:
    (length,) = struct.unpack("<Q", weights[:8])
    return json.loads(weights[8 : 8 + length]), weights[8 + length :]


def _tensors(header: dict[str, Any], body: bytes) -> tuple[Tensor, ...]:
    entries = sorted((k, v) for k, v in header.items() if k != "__metadata__")
    return tuple(
        Tensor(name, e["dtype"], tuple(e["shape"]), body[e["data_offsets"][0] : e["data_offsets"][1]])
        for name, e in entries
    )


def _safetensors(tensors: list[Tensor], metadata: Any = None) -> bytes:
    """A file whose offsets tile the data exactly, whatever the names, shapes and dtypes claim."""
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    position = 0
    for tensor in tensors:
        end = position + len(tensor.data)
        header[tensor.name] = {
            "dtype": tensor.dtype,
            "shape": list(tensor.shape),
            "data_offsets": [position, end],
        }
        position = end
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + b"".join(t.data for t in tensors)


@pytest.fixture(scope="module")
def good(tiny_transformer, tmp_path_factory) -> GoodAdapter:
    from omni_engine.lora.synth import write_random_adapter

    path = write_random_adapter(tmp_path_factory.mktemp("fuzz") / "good", tiny_transformer, seed=7)
    weights = (path / WEIGHTS).read_bytes()
    header, body = _split(weights)
    config = json.loads((path / CONFIG).read_text())
    adapter = GoodAdapter(
        config, weights, header, body, _tensors(header, body), adaptable_layers(tiny_transformer)
    )
    assert _read_checked(json.dumps(config).encode(), weights, adapter.layers) is not None  # valid start
    return adapter


def _read_checked(
    config: bytes | None, weights: bytes, layers: dict[str, LayerShape], *, weights_name: str = WEIGHTS
) -> LoRAAdapter | None:
    """Write the adapter, read it and check it against `layers`, as the engine does before a load: the
    adapter if accepted (and then it must be sound), None for an AdapterError. Anything else
    propagates, which is the failure the fuzzing looks for."""
    with tempfile.TemporaryDirectory(prefix="omni-fuzz-") as tmp:
        directory = Path(tmp) / "adapter"
        directory.mkdir()
        if config is not None:
            (directory / CONFIG).write_bytes(config)
        (directory / weights_name).write_bytes(weights)
        try:
            adapter = read_adapter(str(directory), name="fuzz", component=COMPONENT, roots=None)
            check_compatible(adapter, layers, max_rank=MAX_RANK)
        except AdapterError:
            return None
    _assert_sound(adapter)
    return adapter


def _assert_sound(adapter: LoRAAdapter) -> None:
    """What the engine relies on in every adapter the validator lets through."""
    config = adapter.config
    assert isinstance(config.r, int) and config.r >= 1, config
    assert math.isfinite(config.lora_alpha), config
    assert all(math.isfinite(alpha) for alpha in config.alpha_pattern.values()), config
    assert all(isinstance(r, int) and r >= 1 for r in config.rank_pattern.values()), config
    assert adapter.ranks and adapter.tensors and adapter.nbytes > 0
    assert set(adapter.tensors) == {m + suffix for m in adapter.ranks for suffix in LORA_SUFFIXES}
    for module, rank in adapter.ranks.items():
        a, b = (adapter.tensors[module + suffix] for suffix in LORA_SUFFIXES)
        assert a.dtype.is_floating_point and b.dtype.is_floating_point, module
        assert a.shape[0] == b.shape[1] == rank >= 1, module
        assert bool(a.isfinite().all()) and bool(b.isfinite().all()), f"{module}: non-finite weights"


# -- strategies ---------------------------------------------------------------------------------

JSON_LEAVES = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
SMALL_INTS = st.integers(-2, 40) | st.sampled_from(
    [2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63)]
)
SHAPES = st.lists(SMALL_INTS, max_size=4)
PEFT_PREFIX = "base_model.model."


def _module(tensor: Tensor) -> str:
    return tensor.name.removeprefix(PEFT_PREFIX).rsplit(".", 2)[0]


@st.composite
def damaged_bytes(draw, good: GoodAdapter) -> Sample:
    """The good file with raw damage: bit flips (mostly in the header), truncation, a random length
    prefix, or random tensor data under an intact header."""
    data = bytearray(good.weights)
    (header_len,) = struct.unpack("<Q", good.weights[:8])
    header_end = 8 + header_len
    kind = draw(st.sampled_from(["flip", "truncate", "prefix", "data", "flip+truncate"]))
    steps, fill = [kind], None
    if kind.startswith("flip"):
        top = draw(st.sampled_from([header_end, len(data)])) * 8
        bits = draw(st.lists(st.integers(0, top - 1), min_size=1, max_size=24))
        for bit in bits:
            data[bit // 8] ^= 1 << (bit % 8)
        steps.append(f"bits {bits}")
    if kind.endswith("truncate"):
        size = draw(st.integers(0, len(data) - 1))
        data = data[:size]
        steps.append(f"to {size} bytes")
    if kind == "prefix":
        claimed = draw(
            st.integers(0, 2**64 - 1) | st.integers(max(0, header_len - 16), header_len + 16) | st.just(0)
        )
        data[:8] = struct.pack("<Q", claimed)
        steps.append(f"header length {claimed}")
    if kind == "data":
        seed = draw(st.integers(0, 2**32))
        fill = draw(st.sampled_from(["random", "nan", "inf", "zero"]))
        size = len(data) - header_end
        data[header_end:] = {
            "random": random.Random(seed).randbytes(size),
            "nan": b"\x00\x00\xc0\x7f" * (size // 4),
            "inf": b"\x00\x00\x80\x7f" * (size // 4),
            "zero": bytes(size),
        }[fill]
        steps.append(f"{fill} (seed {seed})")
    # Offsets tile the data exactly, so any truncation breaks the file; NaN and inf are never weights.
    must_fail = kind.endswith("truncate") or (kind == "data" and fill in ("nan", "inf"))
    return Sample(json.dumps(good.config).encode(), bytes(data), WEIGHTS, tuple(steps), must_fail)


@st.composite
def random_header(draw, good: GoodAdapter) -> Sample:
    """A header of random JSON: the whole header, one tensor's entry or one field of it, or metadata."""
    header = copy.deepcopy(good.header)
    names = sorted(k for k in header if k != "__metadata__")
    kind = draw(st.sampled_from(["whole", "entry", "field", "metadata", "extra-key"]))
    if kind == "whole":
        header = draw(JSON_VALUES | st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=4))
        step = f"header = {header!r}"
    elif kind == "entry":
        name, value = draw(st.sampled_from(names)), draw(JSON_VALUES)
        header[name] = value
        step = f"{name} = {value!r}"
    elif kind == "field":
        name = draw(st.sampled_from(names))
        key = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))
        value = draw(
            JSON_VALUES
            | st.sampled_from(sorted(DTYPE_BYTES))
            | SHAPES
            | st.lists(SMALL_INTS, min_size=2, max_size=2)
        )
        header[name][key] = value
        step = f"{name}.{key} = {value!r}"
    elif kind == "metadata":
        value = draw(JSON_VALUES | st.dictionaries(st.text(max_size=8), st.text(max_size=8)))
        header["__metadata__"] = value
        step = f"__metadata__ = {value!r}"
    else:
        name, value = draw(st.text(max_size=16)), draw(JSON_VALUES)
        header[name] = value
        step = f"{name!r} = {value!r}"
    text = json.dumps(header).encode()
    keep_body = draw(st.booleans())
    body = good.body if keep_body else draw(st.binary(max_size=64))
    weights = struct.pack("<Q", len(text)) + text + body
    return Sample(json.dumps(good.config).encode(), weights, WEIGHTS, (step, f"body {len(body)} bytes"))


def _reshapes(tensor: Tensor) -> list[tuple[int, ...]]:
    n = len(tensor.data) // DTYPE_BYTES[tensor.dtype]
    rows = max(1, tensor.shape[0]) if tensor.shape else 1
    return [(n,), (1, n), (n, 1), (n // rows, rows), (rows, n // rows, 1), ()]


@st.composite
def _mutated_tensors(draw, good: GoodAdapter) -> tuple[list[Tensor], list[str]]:
    """The good tensors, renamed, reshaped, retyped, dropped or added to; the layout stays valid."""
    tensors, steps = list(good.tensors), []
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(tensors) - 1))
        t = tensors[i]
        kind = draw(
            st.sampled_from(["rename", "swap-ab", "drop", "reshape", "retype", "zeros", "add", "dup"])
        )
        if kind == "rename":
            module = _module(t)
            new = draw(
                st.sampled_from(
                    [
                        f"{COMPONENT}.{t.name.removeprefix(PEFT_PREFIX)}",
                        f"text_encoder.{module}.lora_A.weight",
                        f"{PEFT_PREFIX}{module}.lora_A.bias",
                        f"{PEFT_PREFIX}{module}.lora_magnitude_vector",
                        f"{PEFT_PREFIX}{module}.lora_A.default.weight",
                        f"{PEFT_PREFIX}.lora_A.weight",
                        ".lora_A.weight",
                        "lora_A.weight",
                    ]
                )
                | st.text(max_size=24)
                | st.text(max_size=12).map(lambda s: f"{PEFT_PREFIX}{s}.lora_B.weight")
            )
            tensors[i] = Tensor(new, t.dtype, t.shape, t.data)
            steps.append(f"rename {t.name} -> {new!r}")
        elif kind == "swap-ab":
            swapped = t.name.replace("lora_A", "@").replace("lora_B", "lora_A").replace("@", "lora_B")
            tensors[i] = Tensor(swapped, t.dtype, t.shape, t.data)
            steps.append(f"rename {t.name} -> {swapped}")
        elif kind == "drop" and len(tensors) > 1:
            del tensors[i]
            steps.append(f"drop {t.name}")
        elif kind == "reshape":
            shape = draw(st.sampled_from(_reshapes(t)))
            tensors[i] = Tensor(t.name, t.dtype, shape, t.data)
            steps.append(f"reshape {t.name} to {shape}")
        elif kind == "retype":
            dtype = draw(st.sampled_from(sorted(DTYPE_BYTES)))
            tensors[i] = Tensor(t.name, dtype, (len(t.data) // DTYPE_BYTES[dtype],), t.data)
            steps.append(f"retype {t.name} as {dtype}")
        elif kind == "zeros":
            shape = tuple(draw(st.lists(st.integers(0, 40), max_size=3)))
            dtype = draw(st.sampled_from(["F16", "F32", "F64", "BF16"]))
            tensors[i] = Tensor(t.name, dtype, shape, bytes(math.prod(shape) * DTYPE_BYTES[dtype]))
            steps.append(f"zeros {t.name} {dtype}{list(shape)}")
        elif kind == "add":
            shape = tuple(draw(st.lists(st.integers(0, 8), max_size=3)))
            name = draw(st.text(max_size=24) | st.just(t.name + "x"))
            tensors.append(Tensor(name, "F32", shape, bytes(math.prod(shape) * 4)))
            steps.append(f"add {name!r} F32{list(shape)}")
        elif kind == "dup":
            tensors.append(Tensor(t.name.replace("lora_", "lora_X"), t.dtype, t.shape, t.data))
            steps.append(f"copy {t.name}")
    # Names are unique in a JSON object: the last one wins, as a writer would leave it.
    return list({t.name: t for t in tensors}.values()), steps


@st.composite
def well_formed_variant(draw, good: GoodAdapter) -> Sample:
    """A file whose layout is valid, with wrong content: what reaches the key, shape and rank checks.

    Half the time in the diffusers layout: component-prefixed keys and no adapter_config.json, the
    config (or random JSON) in the header's metadata, maybe prefixed by the component too.
    """
    tensors, steps = draw(_mutated_tensors(good))
    config = draw(st.just(good.config) | config_dicts(good))
    if config is not good.config:
        steps.append(f"config {config!r}")
    if draw(st.booleans()):
        metadata = draw(
            st.none() | st.just({"format": "pt"}) | st.dictionaries(st.text(max_size=6), st.text(max_size=6))
        )
        steps.append(f"PEFT layout, metadata {metadata!r}")
        return Sample(json.dumps(config).encode(), _safetensors(tensors, metadata), WEIGHTS, tuple(steps))
    renamed = [
        Tensor(f"{COMPONENT}.{t.name.removeprefix(PEFT_PREFIX)}", t.dtype, t.shape, t.data)
        if t.name.startswith(PEFT_PREFIX)
        else t
        for t in tensors
    ]
    if isinstance(config, dict) and draw(st.booleans()):
        config = {f"{COMPONENT}.{k}": v for k, v in config.items()}
    text = draw(st.just(json.dumps(config)) | JSON_VALUES.map(json.dumps) | st.text(max_size=16))
    steps.append(f"diffusers layout, {DIFFUSERS_METADATA_KEY} {text[:200]!r}")
    weights = _safetensors(renamed, {"format": "pt", DIFFUSERS_METADATA_KEY: text})
    return Sample(None, weights, DIFFUSERS_WEIGHTS, tuple(steps))


CONFIG_KEYS = (
    "r",
    "lora_alpha",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "target_modules",
    "peft_type",
    "use_dora",
    "bias",
    "lora_bias",
    "fan_in_fan_out",
    "modules_to_save",
    "layers_to_transform",
    "layer_replication",
    "trainable_token_indices",
    "init_lora_weights",
    "task_type",
)


@st.composite
def config_dicts(draw, good: GoodAdapter) -> Any:
    """The good config with random JSON values for the keys that matter, some keys dropped or added;
    now and then not an object at all."""
    if draw(st.integers(0, 19)) == 0:
        return draw(JSON_VALUES)
    config = dict(good.config)
    modules = sorted({_module(t) for t in good.tensors})
    module_keys = (
        st.sampled_from(modules) | st.text(max_size=12) | st.sampled_from(["to_q", "attn.to_k", ".*", "("])
    )
    numbers = st.integers() | st.floats() | st.booleans() | st.sampled_from([0, 4, -4, 1e308, 2**53])
    typed = {
        "r": numbers,
        "lora_alpha": numbers,
        "use_rslora": JSON_LEAVES,
        "rank_pattern": st.dictionaries(module_keys, numbers | JSON_VALUES, max_size=4),
        "alpha_pattern": st.dictionaries(module_keys, numbers | JSON_VALUES, max_size=4),
        "target_modules": JSON_VALUES | st.lists(st.text(max_size=8), max_size=4),
        "peft_type": st.sampled_from(["LORA", "LOHA", "lora"]) | JSON_LEAVES,
    }
    for key in draw(st.lists(st.sampled_from(CONFIG_KEYS), max_size=4, unique=True)):
        config[key] = draw(typed.get(key, JSON_VALUES))
    for key in draw(st.lists(st.sampled_from(sorted(config)), max_size=3, unique=True)):
        config.pop(key, None)
    if draw(st.integers(0, 9)) == 0:
        config[draw(st.text(max_size=10))] = draw(JSON_VALUES)
    return config


# -- the fuzz tests -----------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_damaged_weight_bytes_give_a_sound_adapter_or_an_adapter_error(good, data):
    data.draw(damaged_bytes(good)).check(good.layers)


@FUZZ
@given(data=st.data())
def test_random_header_json_gives_a_sound_adapter_or_an_adapter_error(good, data):
    data.draw(random_header(good)).check(good.layers)


@FUZZ
@given(data=st.data())
def test_well_formed_files_with_wrong_content_give_a_sound_adapter_or_an_adapter_error(good, data):
    data.draw(well_formed_variant(good)).check(good.layers)


@FUZZ
@given(data=st.data())
def test_random_config_values_give_a_sound_adapter_or_an_adapter_error(good, data):
    config = data.draw(config_dicts(good))
    _read_checked(json.dumps(config).encode(), good.weights, good.layers)


@FUZZ
@given(raw=st.binary(max_size=256) | st.text(max_size=128).map(str.encode))
def test_random_config_bytes_give_a_sound_adapter_or_an_adapter_error(good, raw):
    _read_checked(raw, good.weights, good.layers)


# -- the inputs that found bugs, and their neighbours that already pass ---------------------------

DEEP = 100_000  # nesting levels: beyond Python's recursion limit
DIGITS = 5_000  # an integer literal above Python's 4300-digit conversion limit


def _header_file(header_text: bytes, body: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header_text)) + header_text + body


def _config_with(good: GoodAdapter, **raw_values: str) -> bytes:
    """The good config with values spliced in as raw JSON text (json.dumps cannot write them)."""
    text = json.dumps({k: v for k, v in good.config.items() if k not in raw_values})
    extra = "".join(f", {json.dumps(k)}: {v}" for k, v in raw_values.items())
    return (text[:-1] + extra + "}").encode()


def _diffusers_file(good: GoodAdapter, metadata_text: str) -> bytes:
    tensors = [
        Tensor(f"{COMPONENT}.{t.name.removeprefix(PEFT_PREFIX)}", t.dtype, t.shape, t.data)
        for t in good.tensors
    ]
    return _safetensors(tensors, {"format": "pt", DIFFUSERS_METADATA_KEY: metadata_text})


CASES = [
    "config-alpha-huge-int",
    "config-alpha-pattern-huge-int",
    "config-int-5000-digits",
    "config-deeply-nested",
    "header-deeply-nested",
    "header-int-5000-digits",
    "header-dtype-list",
    "header-dtype-object",
    "diffusers-metadata-deeply-nested",
    "diffusers-metadata-int-5000-digits",
    "config-alpha-float-overflow",
    "config-alpha-nan",
    "config-r-huge-int",
    "config-r-bool",
    "config-empty",
    "config-utf16",
    "header-length-max",
    "header-not-object",
    "header-shape-bools",
    "header-empty-file",
]


# Pinned inputs that are valid after all: they must be read, and read soundly.
ACCEPTED = frozenset({"config-utf16"})  # the good config in UTF-16 with a BOM, which JSON readers accept


def _case(case: str, good: GoodAdapter) -> tuple[bytes | None, bytes, str]:
    config = json.dumps(good.config).encode()
    weights = good.weights
    name = WEIGHTS
    if case == "config-alpha-huge-int":
        config = _config_with(good, lora_alpha="1" + "0" * 400)
    elif case == "config-alpha-pattern-huge-int":
        config = _config_with(good, alpha_pattern='{"to_q": 1' + "0" * 400 + "}")
    elif case == "config-int-5000-digits":
        config = _config_with(good, lora_alpha="1" * DIGITS)
    elif case == "config-deeply-nested":
        config = _config_with(good, target_modules="[" * DEEP + "]" * DEEP)
    elif case == "header-deeply-nested":
        weights = _header_file(b'{"x": ' + b"[" * DEEP + b"]" * DEEP + b"}")
    elif case == "header-int-5000-digits":
        weights = _header_file(
            b'{"x": {"dtype": "F32", "shape": [' + b"1" * DIGITS + b'], "data_offsets": [0, 4]}}'
        )
    elif case == "header-dtype-list":
        weights = _header_file(b'{"x": {"dtype": [], "shape": [1], "data_offsets": [0, 4]}}', bytes(4))
    elif case == "header-dtype-object":
        weights = _header_file(b'{"x": {"dtype": {}, "shape": [1], "data_offsets": [0, 4]}}', bytes(4))
    elif case == "diffusers-metadata-deeply-nested":
        config, name = None, DIFFUSERS_WEIGHTS
        weights = _diffusers_file(good, "[" * DEEP + "]" * DEEP)
    elif case == "diffusers-metadata-int-5000-digits":
        config, name = None, DIFFUSERS_WEIGHTS
        weights = _diffusers_file(good, '{"r": ' + "4" * DIGITS + "}")
    elif case == "config-alpha-float-overflow":
        config = _config_with(good, lora_alpha="1e400")  # parses as inf
    elif case == "config-alpha-nan":
        config = _config_with(good, lora_alpha="NaN")
    elif case == "config-r-huge-int":
        config = _config_with(good, r="1" + "0" * 400)
    elif case == "config-r-bool":
        config = _config_with(good, r="true")
    elif case == "config-empty":
        config = b""
    elif case == "config-utf16":
        config = json.dumps(good.config).encode("utf-16")
    elif case == "header-length-max":
        weights = struct.pack("<Q", 2**64 - 1) + weights[8:]
    elif case == "header-not-object":
        weights = _header_file(b"[1, 2, 3]")
    elif case == "header-shape-bools":
        weights = _header_file(b'{"x": {"dtype": "F32", "shape": [true], "data_offsets": [0, 4]}}', bytes(4))
    elif case == "header-empty-file":
        weights = b""
    else:
        raise AssertionError(f"unknown case {case}")
    return config, weights, name


@pytest.mark.parametrize("case", CASES)
def test_hostile_adapter_files_give_an_adapter_error(good, case):
    config, weights, name = _case(case, good)
    adapter = _read_checked(config, weights, good.layers, weights_name=name)
    if case in ACCEPTED:
        assert adapter is not None, f"{case} was refused"
    else:
        assert adapter is None, f"{case} was accepted"


# -- bounded time -------------------------------------------------------------------------------

# Above this much CPU time, validating one adapter is a hang: the worker's consumer is stuck
# meanwhile. The reading itself takes well under a second; the rest is the interpreter and torch
# starting. CPU time, not wall time, so that a busy machine does not fail the test; the wall-clock
# limit only stops a real hang.
VALIDATION_LIMIT_S = 30
HANG_S = 600
_READ_SCRIPT = textwrap.dedent(
    """
    import sys
    from omni_engine.errors import AdapterError
    from omni_engine.lora.adapter import read_adapter
    try:
        read_adapter(sys.argv[1], name="fuzz", component="transformer", roots=None)
        print("accepted")
    except AdapterError as e:
        print("AdapterError", type(e).__name__)
    """
)


def test_a_crafted_rank_pattern_is_validated_in_bounded_time(tmp_path):
    directory = tmp_path / "slow"
    directory.mkdir()
    # About 1 MiB of config (the reader's cap): 4,500 keys of 200 wildcards.
    keys = {"." * 200 + f"k{i}": 4 for i in range(4500)}
    (directory / CONFIG).write_text(json.dumps({"r": 4, "lora_alpha": 4, "rank_pattern": keys}))
    # Zero-size tensors tile trivially, so 200 modules with 20,000-character dotted names pass the layout.
    modules = [f"{PEFT_PREFIX}{'a.' * 10_000}m{m}" for m in range(200)]
    tensors = [Tensor(f"{m}.lora_{ab}.weight", "F32", (0, 0), b"") for m in modules for ab in "AB"]
    (directory / WEIGHTS).write_bytes(_safetensors(tensors))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        result = subprocess.run(
            [sys.executable, "-c", _READ_SCRIPT, str(directory)],
            capture_output=True,
            text=True,
            timeout=HANG_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"validating one adapter did not finish in {HANG_S} s")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    assert cpu_s < VALIDATION_LIMIT_S, f"validating one adapter took {cpu_s:.0f} s of CPU"
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[0] in ("accepted", "AdapterError"), result.stdout
