"""The adapter's configuration: parsed, checked, and turned into what PEFT injects."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from omni_engine.errors import InvalidAdapterError

# LoraConfig options omni-batch cannot honour: an adapter must leave each at its inert value,
# or its image would silently differ from what PEFT produces.
UNSUPPORTED_UNLESS = {
    "use_dora": (False, None),
    "lora_bias": (False, None),
    "bias": ("none", None),
    "fan_in_fan_out": (False, None),
    "modules_to_save": (None, []),
    "layer_replication": (None, []),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, {}, []),
    "alora_invocation_tokens": (None,),
    "layers_to_transform": (None,),
}


_MODULE_PATH = re.compile(r"[A-Za-z0-9_.-]+")
MAX_PATTERN_KEYS = 4096
MAX_PATTERN_KEY_CHARS = 512


def _lora_config_fields() -> frozenset[str]:
    from peft import LoraConfig

    return frozenset(f.name for f in dataclasses.fields(LoraConfig))


def _peft_default(name: str) -> Any:
    """PEFT's own default, so a config that omits a key computes what PeftModel computes."""
    from peft import LoraConfig

    return LoraConfig.__dataclass_fields__[name].default


@dataclass(frozen=True)
class AdapterConfig:
    """The parts of a PEFT LoraConfig that decide what the adapter computes."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, *, adapter: str, source: str) -> AdapterConfig:
        """Check every key at once and report all problems in one error."""
        if not isinstance(data, dict):
            raise InvalidAdapterError(adapter, f"{source}: expected a JSON object, got {type(data).__name__}")
        problems: list[str] = []

        unknown = sorted(set(data) - _lora_config_fields())
        if unknown:
            problems.append(f"unknown key(s) {', '.join(unknown)}")
        peft_type = data.get("peft_type", "LORA")
        if peft_type != "LORA":
            problems.append(f"peft_type is {peft_type!r}, only 'LORA' is supported")
        for key, inert in UNSUPPORTED_UNLESS.items():
            if key in data and data[key] not in inert:
                problems.append(f"{key}={data[key]!r} is not supported")

        r = data.get("r")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            problems.append(f"r must be a positive integer, got {r!r}")
        alpha = data.get("lora_alpha", _peft_default("lora_alpha"))
        if not _finite_number(alpha):
            problems.append(f"lora_alpha must be a finite number, got {alpha!r}")
        use_rslora = data.get("use_rslora", False)
        if not isinstance(use_rslora, bool):
            problems.append(f"use_rslora must be true or false, got {use_rslora!r}")
        rank_pattern = data.get("rank_pattern") or {}
        alpha_pattern = data.get("alpha_pattern") or {}
        if not isinstance(rank_pattern, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in rank_pattern.values()
        ):
            problems.append("rank_pattern must map module patterns to positive integers")
        if not isinstance(alpha_pattern, dict) or not all(_finite_number(v) for v in alpha_pattern.values()):
            problems.append("alpha_pattern must map module patterns to finite numbers")

        for name, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
            # PEFT uses these keys as regular expressions: only literal module paths of bounded
            # length and number are accepted, so a config cannot raise re.error or stall matching.
            keys = list(pattern) if isinstance(pattern, dict) else []
            bad = [
                k for k in keys if not (_MODULE_PATH.fullmatch(str(k)) and len(k) <= MAX_PATTERN_KEY_CHARS)
            ]
            if bad:
                problems.append(
                    f"{name} keys must be module paths ([A-Za-z0-9_.-], at most {MAX_PATTERN_KEY_CHARS} "
                    f"characters), got {bad[:3]!r}"
                )
            if len(keys) > MAX_PATTERN_KEYS:
                problems.append(f"{name} has {len(keys)} keys; at most {MAX_PATTERN_KEYS} are accepted")

        if problems:
            raise InvalidAdapterError(adapter, f"{source}: " + "; ".join(problems))
        return cls(
            r=r,
            lora_alpha=float(alpha),
            use_rslora=use_rslora,
            rank_pattern=dict(rank_pattern),
            alpha_pattern={k: float(v) for k, v in alpha_pattern.items()},
        )

    def rank_for(self, module: str) -> int:
        """PEFT's rule, with keys taken literally: the first key that is the module path's tail."""
        for key, rank in self.rank_pattern.items():
            if module == key or module.endswith("." + key):
                return rank
        return self.r

    def alpha_for(self, module: str) -> float:
        """The module's lora_alpha, by the same rule as `rank_for`."""
        for key, alpha in self.alpha_pattern.items():
            if module == key or module.endswith("." + key):
                return alpha
        return self.lora_alpha

    def peft_kwargs(self, modules: list[str]) -> dict[str, Any]:
        """LoraConfig arguments that target exactly these modules, nothing more."""
        return {
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "use_rslora": self.use_rslora,
            # Escaped, so PEFT's regex match means what `rank_for` means.
            "rank_pattern": {re.escape(k): v for k, v in self.rank_pattern.items()},
            "alpha_pattern": {re.escape(k): v for k, v in self.alpha_pattern.items()},
            # A string is matched in full by PEFT; a list would also match any module whose path
            # merely ends with a listed one.
            "target_modules": "|".join(re.escape(module) for module in sorted(modules)),
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False
