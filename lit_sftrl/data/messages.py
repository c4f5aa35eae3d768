"""Readers for SFT data as it ships today: conversational ``messages`` records, one per line of a JSONL file or
one per row of a Hugging Face ``datasets`` directory (``save_to_disk``) or parquet file.

Each record is ``{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...], "images": [...]?}``.
``content`` is a string, or a list of parts as chat templates take them (``{"type": "text", "text": str}`` and
``{"type": "image"}``, the layout TRL's vision datasets use); text parts are joined, text kept exactly as given.
An image is a path relative to the file's folder (the dataset directory for ``save_to_disk``), held to the same
rules as the LLaVA reader's (:mod:`lit_sftrl.envs.images`): inside that folder, a regular file, its declared
pixel count within ``max_image_pixels``; in a dataset it may also be stored in the dataset (the ``Image``
feature), its header checked the same way. A conversation takes at most one image, placed with its first user
turn as every prompt's image is (an image part elsewhere is refused).

A JSONL file is read here, line by line, so an error names the line; the other two go through ``datasets``,
their rows read as stored (images not decoded, nothing written next to the data).
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lit_sftrl.envs.images import (
    MAX_IMAGE_PIXELS,
    check_image_header,
    check_image_whole,
    confined_file,
    load_rgb,
)

ROLES = ("system", "user", "assistant")
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)


def read_messages(path: str | Path, *, lazy: bool = False,
                  max_image_pixels: int = MAX_IMAGE_PIXELS) -> list[dict[str, Any]]:
    """Return ``[{"messages": [...], "image": ndarray | path | None}]`` from a ``messages`` JSONL file, a
    ``datasets`` directory or a parquet file; a malformed record is an error naming it. ``lazy=True``: ``image``
    is the checked path (or an embedded image's bytes), decoded with :func:`decode_image` when a batch draws it."""
    path = Path(path)
    if path.is_dir():
        records, folder = _dataset_records(path, lambda datasets: datasets.load_from_disk(str(path))), path
    elif path.suffix in PARQUET_SUFFIXES:
        with tempfile.TemporaryDirectory() as cache:  # datasets' own cache would keep a copy of the file
            records, folder = _dataset_records(path, lambda datasets: datasets.Dataset.from_parquet(
                str(path), keep_in_memory=True, cache_dir=cache)), path.parent
    elif path.suffix in JSONL_SUFFIXES:
        records, folder = _jsonl_records(path), path.parent
    else:
        raise ValueError(f"SFT messages data {str(path)!r}: expected a .jsonl file, a .parquet file or a "
                         "datasets directory (save_to_disk)")
    conversations = [conversation(record, folder, where, lazy, max_image_pixels) for where, record in records]
    if not conversations:
        raise ValueError(f"SFT messages data {str(path)!r} holds no records")
    return conversations


def _jsonl_records(path: Path) -> list[tuple[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read messages JSONL {str(path)!r}: {error}") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append((f"{path}:{number}", json.loads(line)))
        except ValueError as error:
            raise ValueError(f"{path}:{number}: not a JSON object ({error})") from None
    return records


def _dataset_records(path: Path, load) -> list[tuple[str, Any]]:
    import datasets

    try:
        dataset = load(datasets)
    except Exception as error:  # datasets raises its own, pyarrow's and OS errors: all mean "cannot read it"
        raise ValueError(f"cannot read the dataset {str(path)!r}: {error}") from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise ValueError(f"{path}: a DatasetDict without a 'train' split (splits: {sorted(dataset)})")
        dataset = dataset["train"]
    if "messages" not in dataset.column_names:
        raise ValueError(f"{path}: needs a 'messages' column, has {dataset.column_names}")
    columns = [name for name in ("messages", "images") if name in dataset.column_names]
    # As stored (an Image feature as {"bytes", "path"}): casting it not to decode writes a cache beside the data.
    rows = dataset.select_columns(columns).with_format("arrow")[:].to_pylist()
    return [(f"{path}[{i}]", row) for i, row in enumerate(rows)]


def conversation(record: Any, folder: Path, where: str, lazy: bool = False,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> dict[str, Any]:
    """One checked record as ``{"messages", "image"}``; ``where`` names it in errors."""
    turns = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: needs a non-empty 'messages' list")
    messages, image_parts = [], []  # image_parts: the message index of each {"type": "image"} part
    for index, turn in enumerate(turns):
        role = turn.get("role") if isinstance(turn, dict) else None
        if role not in ROLES:
            raise ValueError(f"{where}: each message needs a 'role' of {', '.join(ROLES)}, got {turn!r}")
        text, images_here = _content(turn.get("content"), where)
        messages.append({"role": role, "content": text})
        image_parts += [index] * images_here
    spoken = [message["role"] for message in messages if message["role"] != "system"]
    if not spoken or spoken[0] != "user":
        raise ValueError(f"{where}: the first message after any system message must be the user's")
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last message must be the assistant's")
    images = record.get("images") or []
    if not isinstance(images, list):
        raise ValueError(f"{where}: 'images' must be a list, got {type(images).__name__}")
    if len(images) > 1 or len(image_parts) > 1:
        raise ValueError(f"{where}: {max(len(images), len(image_parts))} images; a conversation takes at most one "
                         "(with its first user turn)")
    first_user = [message["role"] for message in messages].index("user")
    if image_parts and (image_parts[0] != first_user or not images):
        where_it_is = "has no image in 'images'" if not images else f"is in message {image_parts[0]}"
        raise ValueError(f"{where}: the image part {where_it_is}; it must be in the first user message "
                         f"({first_user}), with its image in 'images'")
    image = _image(images[0], folder, where, lazy, max_pixels) if images else None
    return {"messages": messages, "image": image}


def _content(content: Any, where: str) -> tuple[str, int]:
    """A message's text and its number of image parts."""
    if isinstance(content, str):
        return content, 0
    if not isinstance(content, list):
        raise ValueError(f"{where}: a message's 'content' must be a string or a list of parts, got "
                         f"{type(content).__name__}")
    texts, images = [], 0
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            images += 1
        elif kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            raise ValueError(f"{where}: a content part must be {{'type': 'text', 'text': str}} or "
                             f"{{'type': 'image'}}, got {part!r}")
    return "".join(texts), images


def _image(entry: Any, folder: Path, where: str, lazy: bool, max_pixels: int) -> str | bytes | np.ndarray:
    """A checked image: a path inside ``folder`` (a string, or a dataset Image's ``path`` without bytes), or the
    bytes stored in a dataset; lazily the path or bytes, otherwise decoded."""
    data = entry.get("bytes") if isinstance(entry, dict) else None
    if data is not None:
        check_image_header(StoredImage(data), where, max_pixels)
        check_image_whole(StoredImage(data), where)  # a cut-short image refused now, not mid-training
        return data if lazy else decode_image(data, max_pixels)
    name = entry.get("path") if isinstance(entry, dict) else entry
    if not isinstance(name, str):
        raise ValueError(f"{where}: an image must be a file path relative to {str(folder)!r} or an image stored "
                         f"in the dataset, got {type(entry).__name__}")
    image_path = confined_file(folder, name, where, kind="image")
    check_image_header(image_path, where, max_pixels)
    check_image_whole(image_path, where)
    return str(image_path) if lazy else load_rgb(str(image_path), max_pixels)


class StoredImage(io.BytesIO):
    """An image's bytes stored in a dataset, named as such in the image checks' messages."""

    def __str__(self) -> str:
        return "stored in the dataset"


def decode_image(image: str | bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """A lazily read image, decoded to RGB: a checked path (cached by path) or bytes stored in a dataset."""
    if isinstance(image, str):
        return load_rgb(image, max_pixels)
    with Image.open(io.BytesIO(image)) as handle:  # its header was checked when the record was read
        return np.asarray(handle.convert("RGB"))
