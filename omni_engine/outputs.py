"""What `Omni.generate` returns: one output per prompt."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass
class OmniRequestOutput:
    prompt: str
    images: list[Image.Image]
    metadata: dict[str, Any] = field(default_factory=dict)
