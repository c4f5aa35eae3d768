"""Reader for the released LLaVA-style SFT JSON: ``[{"image"?: path, "conversations": [{"from", "value"}]}]``.

The image belongs to the first human turn; ``<image>`` markers (with the newline that follows one, as the
original code removed them) are taken out of the text because the backbone places the image itself, in
whatever way its family expects. Everything else is kept exactly as released: the released answers begin
with a newline, and a model trained on them should learn that layout.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

from lit_sftrl.envs.images import (
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    check_image_header,
    check_image_whole,
    confined_file,
    load_rgb,
)

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
IMAGE_MARKER = "<image>"
MAX_TURN_CHARS = 100_000  # one turn's text, checked before it is tokenised (~25 k tokens; 8,192 are trained on)
_MARKER = re.compile(re.escape(IMAGE_MARKER) + r"\n?")


def read_llava_json(path: str | Path, image_folder: str | Path | None = None, *, lazy: bool = False,
                    max_image_pixels: int = MAX_IMAGE_PIXELS, max_image_bytes: int = MAX_IMAGE_BYTES,
                    max_turn_chars: int = MAX_TURN_CHARS) -> list[dict[str, Any]]:
    """Return ``[{"messages": [...], "image": ndarray | None}]``; malformed entries are errors naming the entry.

    Image paths must stay inside ``image_folder`` and name regular files of at most ``max_image_bytes`` whose
    header declares at most ``max_image_pixels``, and whose data is whole (a truncated file is refused here,
    naming the sample, not mid-training). A turn longer than ``max_turn_chars`` is refused before anything
    tokenises it (a 20 MB turn took 6 GB and a minute to tokenise before the token limit refused it).
    ``lazy=True``: ``image`` is the checked path, to be decoded with :func:`load_rgb` (cached by path) when a
    batch needs it."""
    path = Path(path)
    folder = Path(image_folder) if image_folder else path.parent
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read LLaVA-style JSON {path}: {error}") from None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON array of samples, got {type(entries).__name__}")
    limits = {"max_pixels": max_image_pixels, "max_bytes": max_image_bytes, "max_chars": max_turn_chars}
    checked: set[Path] = set()  # records naming one image share its check
    return [_conversation(entry, folder, f"{path}[{i}]", lazy, checked, **limits) for i, entry in enumerate(entries)]


def checked_llava_json(path: str | Path, image_folder: str | Path | None = None, **limits: int) -> list[dict]:
    """:func:`read_llava_json` with ``lazy=True``, remembered for the file as it is now (path, size, mtime): the
    CLI checks the data before it builds the model, and the data module reads the same file again afterwards."""
    stat = Path(path).stat()
    return _checked(str(path), str(image_folder) if image_folder else None, stat.st_size, stat.st_mtime_ns,
                    tuple(sorted(limits.items())))


@functools.lru_cache(maxsize=2)
def _checked(path: str, image_folder: str | None, size: int, mtime_ns: int, limits: tuple) -> list[dict]:
    return read_llava_json(path, image_folder, lazy=True, **dict(limits))


def _conversation(
    entry: Any, folder: Path, where: str, lazy: bool, checked: set[Path], *, max_pixels: int, max_bytes: int,
    max_chars: int,
) -> dict[str, Any]:
    turns = entry.get("conversations") if isinstance(entry, dict) else None
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: needs a non-empty 'conversations' list")
    messages = []
    for number, turn in enumerate(turns):
        role = ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise ValueError(f"{where}: each turn needs 'from' (human or gpt) and a string 'value', got "
                             f"{str(turn)[:200]!r}")
        if len(turn["value"]) > max_chars:
            raise ValueError(f"{where}: turn {number} has {len(turn['value']):,} characters, more than the limit of "
                             f"{max_chars:,} (max_turn_chars)")
        messages.append({"role": role, "content": _MARKER.sub("", turn["value"])})  # no strip: see the docstring
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last turn must be the model's ('gpt')")
    image = None
    if entry.get("image"):
        image_path = confined_file(folder, str(entry["image"]), where, kind="image")
        if image_path not in checked:
            check_image_header(image_path, where, max_pixels, max_bytes)
            check_image_whole(image_path, where)
            checked.add(image_path)
        image = str(image_path) if lazy else load_rgb(str(image_path), max_pixels)
    return {"messages": messages, "image": image}
