"""The adapter's configuration: parsed, checked, and turned into what PEFT injects."""

from __future__ import annotations

import dataclasses
import functools
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


# rank_pattern and alpha_pattern keys are regular expressions to PEFT, which matches each one as
# re.match(rf"(.*\.)?({key})$", module) (peft.utils.other.get_pattern_key) and uses the first that
# matches. Only keys made of these characters are accepted: in them `.` is PEFT's any-character
# wildcard and nothing else is an operator, so a key matches a fixed number of characters and its
# meaning can be computed without backtracking. An optional leading `^` (as diffusers writes keys)
# anchors the key to the whole module path, in PEFT's regex as here.
PATTERN_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
PATTERN_ANCHOR = "^"
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

        # A null key this PEFT does not know is ignored, as PEFT ignores it (a newer PEFT's option
        # left unset); any other value might change what the adapter computes.
        unknown = sorted(k for k in set(data) - _lora_config_fields() if data[k] is not None)
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
            keys = list(pattern) if isinstance(pattern, dict) else []
            if len(keys) > MAX_PATTERN_KEYS:
                problems.append(f"{name} has {len(keys)} keys; at most {MAX_PATTERN_KEYS} are accepted")
                continue
            bad = [f"{key!r} {why}" for key in keys if (why := _pattern_key_problem(key)) is not None]
            if bad:
                problems.append(
                    f"{name} key(s) refused: {'; '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} "
                    f"(keys are module paths of [A-Za-z0-9_.-], '.' matching any character as in PEFT, "
                    f"with an optional leading '^'; other regex operators are not accepted)"
                )

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
        """The module's rank as PEFT computes it: the first rank_pattern key that matches, else r."""
        key = pattern_key(self.rank_pattern, module)
        return self.r if key is None else self.rank_pattern[key]

    def alpha_for(self, module: str) -> float:
        """The module's lora_alpha as PEFT computes it: the first alpha_pattern key that matches."""
        key = pattern_key(self.alpha_pattern, module)
        return self.lora_alpha if key is None else self.alpha_pattern[key]

    def peft_kwargs(self, modules: list[str]) -> dict[str, Any]:
        """LoraConfig arguments that target exactly these modules, nothing more.

        Pattern keys go to PEFT unchanged, so PEFT gives them its own meaning; only the keys that
        decide some targeted module are passed (in their order), which changes no module's result
        and spares PEFT thousands of unused regexes.
        """
        return {
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "use_rslora": self.use_rslora,
            "rank_pattern": _deciding(self.rank_pattern, modules),
            "alpha_pattern": _deciding(self.alpha_pattern, modules),
            # A string is matched in full by PEFT; a list would also match any module whose path
            # merely ends with a listed one.
            "target_modules": "|".join(re.escape(module) for module in sorted(modules)),
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def pattern_matches(key: str, module: str) -> bool:
    r"""bool(re.match(rf"(.*\.)?({key})$", module)), PEFT's test, for a key `_pattern_key_problem` accepts.

    Such a key is a run of single-character atoms (literals, and `.` for any character but a
    newline), so it can only match the module's last len(key) characters (or those before a final
    newline, where `$` also matches), preceded by nothing or by `.*\.` (no newline, then a dot); a
    leading `^` leaves only the match at position 0. Linear time, whatever the key and module.
    """
    anchored = key.startswith(PATTERN_ANCHOR)
    body = _atoms(key.removeprefix(PATTERN_ANCHOR) if anchored else key)
    ends = (len(module), len(module) - 1) if module.endswith("\n") else (len(module),)
    for end in ends:
        start = end - len(body.pattern)
        if start < 0 or not body.fullmatch(module, start, end):
            continue
        if start == 0:
            return True
        if not anchored and module[start - 1] == "." and "\n" not in module[:start]:
            return True
    return False


def pattern_key(pattern: dict[str, Any], module: str) -> str | None:
    """The key PEFT's get_pattern_key picks for `module`: the first that matches, or None."""
    return next((key for key in pattern if pattern_matches(key, module)), None)


def _deciding(pattern: dict[str, Any], modules: list[str]) -> dict[str, Any]:
    used = {pattern_key(pattern, module) for module in modules}
    return {key: value for key, value in pattern.items() if key in used}


@functools.lru_cache(maxsize=MAX_PATTERN_KEYS)
def _atoms(body: str) -> re.Pattern[str]:
    return re.compile(body)


def _pattern_key_problem(key: Any) -> str | None:
    """Why PEFT's regex for this key is refused, or None: see PATTERN_KEY_CHARS."""
    if not isinstance(key, str):
        return "is not a string"
    if len(key) > MAX_PATTERN_KEY_CHARS:
        return f"is {len(key)} characters long, above {MAX_PATTERN_KEY_CHARS}"
    body = key.removeprefix(PATTERN_ANCHOR)
    if not body:
        return "is empty: PEFT would apply it to every module"
    operators = sorted({c for c in body if c not in PATTERN_KEY_CHARS})
    if operators:
        shown = "".join(operators)
        return f"holds {shown!r}, not accepted (a regex operator, or a character no module path has)"
    return None


def peft_scaling(alpha: float, rank: int, *, use_rslora: bool, scale: float = 1.0) -> float:
    """PEFT's factor on `B @ A`, in its order of operations (`set_scale`; `update_layer` is scale
    1.0), so weights merged or set here round exactly as PEFT's."""
    return scale * alpha / (math.sqrt(rank) if use_rslora else rank)


def _finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False
