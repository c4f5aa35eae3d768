"""Readers for SFT data as it ships today: conversational ``messages`` records, one per line of a JSONL file or
one per row of a Hugging Face ``datasets`` directory (``save_to_disk``) or parquet file.

Each record is ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...], "images": [path]?}``.
The image paths are relative to the file's folder (the dataset directory for ``save_to_disk``), and are held to
the same rules as the LLaVA reader's (:mod:`lit_sftrl.envs.images`): inside that folder, regular files, their
declared pixel count within ``max_image_pixels``. A conversation takes at most one image, placed with its first
user turn as every prompt's image is. Text is kept exactly as given.

A JSONL file is read here, line by line, so an error names the line; the other two go through ``datasets``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lit_sftrl.envs.images import MAX_IMAGE_PIXELS, check_image_header, confined_file, load_rgb

ROLES = ("system", "user", "assistant")
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)


def read_messages(path: str | Path, *, lazy: bool = False,
                  max_image_pixels: int = MAX_IMAGE_PIXELS) -> list[dict[str, Any]]:
    """Return ``[{"messages": [...], "image": ndarray | path | None}]`` from a ``messages`` JSONL file, a
    ``datasets`` directory or a parquet file; a malformed record is an error naming it. ``lazy=True``: ``image``
    is the checked path, decoded with :func:`load_rgb` when a batch draws it (as the LLaVA reader's)."""
    path = Path(path)
    if path.is_dir():
        records, folder = _dataset_records(path, lambda datasets: datasets.load_from_disk(str(path))), path
    elif path.suffix in PARQUET_SUFFIXES:
        records, folder = _dataset_records(path, lambda datasets: datasets.Dataset.from_parquet(
            str(path), keep_in_memory=True)), path.parent
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
    return [(f"{path}[{i}]", row) for i, row in enumerate(dataset.select_columns(columns))]


def conversation(record: Any, folder: Path, where: str, lazy: bool = False,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> dict[str, Any]:
    """One checked record as ``{"messages", "image"}``; ``where`` names it in errors."""
    turns = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: needs a non-empty 'messages' list")
    messages = []
    for turn in turns:
        role = turn.get("role") if isinstance(turn, dict) else None
        if role not in ROLES:
            raise ValueError(f"{where}: each message needs a 'role' of {', '.join(ROLES)}, got {turn!r}")
        if not isinstance(turn.get("content"), str):
            raise ValueError(f"{where}: a message's 'content' must be a string (images go in the record's "
                             f"'images'), got {type(turn.get('content')).__name__}")
        messages.append({"role": role, "content": turn["content"]})
    spoken = [message["role"] for message in messages if message["role"] != "system"]
    if not spoken or spoken[0] != "user":
        raise ValueError(f"{where}: the first message after any system message must be the user's")
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last message must be the assistant's")
    images = record.get("images") or []
    if not isinstance(images, list) or not all(isinstance(name, str) for name in images):
        raise ValueError(f"{where}: 'images' must be a list of file paths relative to {str(folder)!r}")
    if len(images) > 1:
        raise ValueError(f"{where}: {len(images)} images; a conversation takes at most one (with its first user turn)")
    image = None
    if images:
        image_path = confined_file(folder, images[0], where, kind="image")
        check_image_header(image_path, where, max_pixels)
        image = str(image_path) if lazy else load_rgb(str(image_path), max_pixels)
    return {"messages": messages, "image": image}
