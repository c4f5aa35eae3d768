"""What a prompt is, for every module of the model layer: a leaf (it imports nothing of the package)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

Message = dict[str, str]
"""One chat turn: ``{"role": "user" | "assistant", "content": str}``."""

Prompt = tuple[list[Message], Union["np.ndarray", "Image.Image", None]]
"""The chat so far and the image of the FIRST user turn (an (H, W, 3) uint8 array or a PIL image), or None for
text-only prompts."""
