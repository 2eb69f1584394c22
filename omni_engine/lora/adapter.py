"""A LoRA adapter read from disk and checked: config, weights, keys, ranks. No model is touched here."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from omni_engine.errors import InvalidAdapterError
from omni_engine.lora.config import AdapterConfig
from omni_engine.lora.files import CONFIG_FILE, PICKLE_SUFFIXES, WEIGHT_FILES, WEIGHT_SUFFIX
from omni_engine.lora.formats import (
    PEFT_PREFIX,
    Converter,
    KeyLayout,
    default_config,
    from_kohya,
    is_kohya,
    module_tensors,
)
from omni_engine.lora.paths import file_sha256, read_capped, resolve_adapter_path, resolve_file
from omni_engine.lora.safetensors_file import read_safetensors

DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
# Largest weights file read (Omni's max_adapter_bytes), and largest config: a LoRA is megabytes.
DEFAULT_MAX_ADAPTER_BYTES = 2 * 1024**3
MAX_CONFIG_BYTES = 1024**2
# A file time stamp this close to the moment a file was checked proves nothing about later writes
# (git's "racily clean" entries): ctime ticks coarsely (a timer tick on Linux, up to seconds on some
# file systems), so a rewrite in the same tick that restores size and mtime (`cp -p`, `rsync -t`, tar)
# leaves the whole stat as it was. Such a file is re-hashed at its next check, until it is older.
RACY_WINDOW_NS = 3 * 10**9

# An adapter's identity: its canonical directory, the sha256 of its weights file and the sha256 of its
# adapter_config.json (None when the config is read from the weights file's header, which the first
# digest covers). Every byte that decides what the adapter computes is in it, so new content under
# the same path, weights or config alone, is a new adapter.
AdapterKey = tuple[str, str, str | None]
# One file as a check saw it: path, st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns.
FileStat = tuple[str, int, int, int, int, int]
# What a directory looked like when read: the config file's stat (when there is one), then the
# weights file's. Cheap to re-check before trusting a cached copy; see `confirm`.
Signature = tuple[FileStat, ...]


@dataclass(frozen=True)
class LoRAAdapter:
    """A checked adapter and what it was read from.

    `sha256` is the weights file's digest (what `sha256sum` prints for it), `config_sha256` the
    config file's, or None for a config in the weights file's header. `checked_ns` is the wall-clock
    time (`time.time_ns`) just before the files were last found to hold this content.
    """

    name: str
    path: Path
    sha256: str
    config_sha256: str | None
    config: AdapterConfig
    tensors: dict[str, torch.Tensor]
    ranks: dict[str, int]
    nbytes: int
    signature: Signature
    checked_ns: int
    # How the file was read where it was not plain PEFT/diffusers with a config (`adapters validate`).
    notes: tuple[str, ...] = ()

    @property
    def key(self) -> AdapterKey:
        return (str(self.path), self.sha256, self.config_sha256)

    @property
    def modules(self) -> list[str]:
        return sorted(self.ranks)

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values())

    @property
    def racy(self) -> bool:
        """Whether a file's time stamps are too close to the last check for the stat to prove anything.

        A ctime no earlier than RACY_WINDOW_NS before the check, or an mtime within the window of it.
        """
        return any(
            ctime >= self.checked_ns - RACY_WINDOW_NS or abs(mtime - self.checked_ns) <= RACY_WINDOW_NS
            for *_, mtime, ctime in self.signature
        )


def _files(location: Path, roots: tuple[Path, ...] | None, *, adapter: str) -> tuple[Path | None, Path]:
    """(config file or None, weights file) of an adapter directory, or of a weights file given itself."""
    if location.is_file():
        if location.suffix in PICKLE_SUFFIXES:
            raise InvalidAdapterError(adapter, _pickle_refusal([location.name]))
        if location.suffix != WEIGHT_SUFFIX:
            raise InvalidAdapterError(
                adapter,
                f"{location.name} is not a {WEIGHT_SUFFIX} file (weights are read from safetensors only)",
            )
        return None, location
    config = resolve_file(location, CONFIG_FILE, roots, adapter=adapter)
    for name in WEIGHT_FILES:
        weights = resolve_file(location, name, roots, adapter=adapter)
        if weights is not None:
            return config, weights
    others = sorted(p.name for p in location.iterdir() if p.suffix == WEIGHT_SUFFIX)
    if len(others) == 1:
        return config, resolve_file(location, others[0], roots, adapter=adapter)
    accepted = f"{WEIGHT_FILES[0]} or {WEIGHT_FILES[1]}"
    if others:
        raise InvalidAdapterError(
            adapter,
            f"no {accepted} in {location}, and {len(others)} other {WEIGHT_SUFFIX} files "
            f"({', '.join(others[:5])}): name the file itself, or keep one",
        )
    pickles = sorted(p.name for p in location.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise InvalidAdapterError(adapter, _pickle_refusal(pickles))
    raise InvalidAdapterError(adapter, f"no {accepted} (nor any other {WEIGHT_SUFFIX} file) in {location}")


def _pickle_refusal(names: list[str]) -> str:
    return (
        f"only pickle weights ({', '.join(names)}); they are never loaded because unpickling can run "
        f"code: convert them to {WEIGHT_FILES[0]}"
    )


def signature(path: str, roots: tuple[Path, ...] | None, *, adapter: str) -> tuple[Path, Signature]:
    """The canonical location (directory or weights file) and the stat of the files a read would use
    (config first, weights last)."""
    directory = resolve_adapter_path(path, roots, adapter=adapter)
    files = [f for f in _files(directory, roots, adapter=adapter) if f is not None]
    stats = []
    for f in files:
        st = f.stat()
        stats.append((str(f), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return directory, tuple(stats)


def confirm(held: LoRAAdapter, sig: Signature, *, checked_ns: int) -> LoRAAdapter | None:
    """`held` if its files still hold the content it was read from, else None (read it again).

    `sig` is a fresh `signature` taken at `checked_ns` (time.time_ns() just before it). Any change of
    path, device, inode, size, mtime or ctime means new content. An unchanged but racy signature is
    confirmed by hashing the files again; the adapter returned then carries the new check time.
    """
    if sig != held.signature:
        return None
    if not held.racy:
        return held
    *config, (weights, *_) = sig
    digests = (
        file_sha256(Path(weights), adapter=held.name),
        file_sha256(Path(config[0][0]), adapter=held.name) if config else None,
    )
    if digests != (held.sha256, held.config_sha256):
        return None
    return dataclasses.replace(held, checked_ns=checked_ns)


def read_adapter(
    path: str,
    *,
    name: str,
    component: str,
    roots: tuple[Path, ...] | None,
    max_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
    converter: Converter | None = None,
) -> LoRAAdapter:
    """Resolve, read and check an adapter. `component` is the model part keys may be prefixed with;
    `converter` is the model's reader of kohya/A1111 files (formats.converter_for)."""
    checked_ns = time.time_ns()  # before the stat: see LoRAAdapter.racy
    directory, sig = signature(path, roots, adapter=name)
    config_file, weights_file = _files(directory, roots, adapter=name)
    weights = read_safetensors(weights_file, adapter=name, max_bytes=max_bytes)

    raw, notes = weights.tensors, ()
    kohya = is_kohya(list(raw))
    if kohya:
        raw = from_kohya(raw, converter, adapter=name)
        notes = (f"a kohya/A1111 file, converted by diffusers' {converter.pipeline} converter",)
    tensors, layout = module_tensors(raw, component, adapter=name)
    config_sha256 = None
    if kohya:
        # Its alphas are folded into lora_B: alpha = r for every module.
        config = AdapterConfig.from_dict(default_config(tensors), adapter=name, source="kohya alphas")
    elif config_file is not None:
        config_bytes = read_capped(config_file, MAX_CONFIG_BYTES, adapter=name)
        config_sha256 = hashlib.sha256(config_bytes).hexdigest()
        try:
            raw_config = json.loads(config_bytes)
        except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, huge ints, deep nesting
            raise InvalidAdapterError(name, f"{CONFIG_FILE} is not valid JSON: {e}") from e
        config = AdapterConfig.from_dict(raw_config, adapter=name, source=CONFIG_FILE)
    elif DIFFUSERS_METADATA_KEY in weights.metadata:
        config = AdapterConfig.from_dict(
            _diffusers_metadata(weights.metadata[DIFFUSERS_METADATA_KEY], component, adapter=name),
            adapter=name,
            source=f"{weights_file.name} header",
        )
    elif layout is KeyLayout.PEFT:
        raise InvalidAdapterError(
            name,
            f"no {CONFIG_FILE}: PEFT's layout ({PEFT_PREFIX}...) needs its config beside the weights "
            f"(and no {DIFFUSERS_METADATA_KEY} in the {weights_file.name} header either)",
        )
    else:
        # What diffusers does with such a file: alpha = r for every module (scale 1 x B @ A).
        config = AdapterConfig.from_dict(default_config(tensors), adapter=name, source="defaults")
        notes = (
            *notes,
            f"no {CONFIG_FILE} and no {DIFFUSERS_METADATA_KEY} in the header: lora_alpha = r for every "
            "module, as diffusers assumes",
        )

    ranks = _ranks(tensors, config, adapter=name)
    return LoRAAdapter(
        name=name,
        path=directory,
        sha256=weights.sha256,
        config_sha256=config_sha256,
        config=config,
        tensors=tensors,
        ranks=ranks,
        nbytes=weights.nbytes,
        signature=sig,
        checked_ns=checked_ns,
        notes=notes,
    )


def _diffusers_metadata(raw: str, component: str, *, adapter: str) -> dict:
    """diffusers writes the config unprefixed (model save) or prefixed by component (pipeline save)."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise InvalidAdapterError(adapter, f"{DIFFUSERS_METADATA_KEY} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise InvalidAdapterError(adapter, f"{DIFFUSERS_METADATA_KEY} is not a JSON object")
    prefix = f"{component}."
    if any(k.startswith(prefix) for k in data):
        return {k.removeprefix(prefix): v for k, v in data.items() if k.startswith(prefix)}
    return data


def _ranks(tensors: dict[str, torch.Tensor], config: AdapterConfig, *, adapter: str) -> dict[str, int]:
    """Each module's rank, from its lora_A, checked against lora_B and the config."""
    problems: list[str] = []
    ranks: dict[str, int] = {}
    modules = {key.rsplit(".", 2)[0] for key in tensors}
    for module in sorted(modules):
        a, b = tensors.get(f"{module}.lora_A.weight"), tensors.get(f"{module}.lora_B.weight")
        if a is None or b is None:
            problems.append(f"{module} lacks {'lora_A' if a is None else 'lora_B'}")
            continue
        if a.ndim < 2 or b.ndim < 2 or a.shape[0] != b.shape[1]:
            problems.append(
                f"{module} has lora_A {list(a.shape)} and lora_B {list(b.shape)} of different ranks"
            )
            continue
        expected = config.rank_for(module)
        if a.shape[0] != expected:
            problems.append(f"{module} has rank {a.shape[0]} but the config says {expected}")
            continue
        ranks[module] = a.shape[0]
    if problems:
        raise InvalidAdapterError(adapter, "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else ""))
    return ranks
