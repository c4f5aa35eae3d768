"""Checkpoint writes that a kill can never leave half done, on any filesystem layout.

Lightning's default writer stages the file in ``$TMPDIR`` and moves it into place; when ``$TMPDIR`` is on
another filesystem than the checkpoints (local /tmp, network storage: the usual cluster layout), that move is a
copy, and a kill during it leaves a truncated checkpoint. Here the temporary file sits beside the target, is
flushed to disk, and ``os.replace`` (atomic within one filesystem) puts it in place.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves go to a temporary name in the same folder, then an atomic rename."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if "://" in str(path):  # remote storage: keep Lightning's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(temporary, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
