"""Reader for the released LLaVA-style SFT JSON: ``[{"image"?: path, "conversations": [{"from", "value"}]}]``.

The image belongs to the first human turn; ``<image>`` markers (with the newline that follows one, as the
original code removed them) are taken out of the text because the backbone places the image itself, in
whatever way its family expects. Everything else is kept exactly as released: the released answers begin
with a newline, and a model trained on them should learn that layout.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from lit_sftrl.envs.images import MAX_IMAGE_PIXELS, check_image_header, confined_file, load_rgb

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
IMAGE_MARKER = "<image>"
_MARKER = re.compile(re.escape(IMAGE_MARKER) + r"\n?")


def read_llava_json(path: str | Path, image_folder: str | Path | None = None, *, lazy: bool = False,
                    max_image_pixels: int = MAX_IMAGE_PIXELS) -> list[dict[str, Any]]:
    """Return ``[{"messages": [...], "image": ndarray | None}]``; malformed entries are errors naming the entry.

    Image paths must stay inside ``image_folder`` and name regular files whose header declares at most
    ``max_image_pixels``. ``lazy=True``: ``image`` is the checked path, to be decoded with :func:`load_rgb`
    (cached by path) when a batch needs it, so a file of many records costs no decoding up front."""
    path = Path(path)
    folder = Path(image_folder) if image_folder else path.parent
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read LLaVA-style JSON {path}: {error}") from None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON array of samples, got {type(entries).__name__}")
    return [_conversation(entry, folder, f"{path}[{i}]", lazy, max_image_pixels) for i, entry in enumerate(entries)]


def _conversation(
    entry: Any, folder: Path, where: str, lazy: bool = False, max_pixels: int = MAX_IMAGE_PIXELS
) -> dict[str, Any]:
    turns = entry.get("conversations") if isinstance(entry, dict) else None
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: needs a non-empty 'conversations' list")
    messages = []
    for turn in turns:
        role = ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise ValueError(f"{where}: each turn needs 'from' (human or gpt) and a string 'value', got {turn!r}")
        messages.append({"role": role, "content": _MARKER.sub("", turn["value"])})  # no strip: see the docstring
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last turn must be the model's ('gpt')")
    image = None
    if entry.get("image"):
        image_path = confined_file(folder, str(entry["image"]), where, kind="image")
        check_image_header(image_path, where, max_pixels)
        image = str(image_path) if lazy else load_rgb(str(image_path), max_pixels)
    return {"messages": messages, "image": image}
