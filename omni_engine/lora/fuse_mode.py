"""When a call merges its adapter into the base weights (`Omni(fuse=...)`, `OMNI_FUSE`).

Torch-free, so settings and command lines can name the modes without loading the engine.
"""

from __future__ import annotations

from enum import StrEnum


class FuseMode(StrEnum):
    AUTO = "auto"  # calls with enough images x steps to repay the merge (`FUSE_MIN_IMAGE_STEPS`)
    ALWAYS = "always"
    NEVER = "never"
