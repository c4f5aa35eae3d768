"""Checkpoints that lose no work: atomic writes on any filesystem layout, and a save when training ends.

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
from lightning.pytorch.callbacks import ModelCheckpoint
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


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also saves when training stops between two periodic saves.

    Lightning's writes ``last.ckpt`` at the end of training only if it never wrote one, so a run whose
    ``max_steps`` is not a multiple of ``every_n_train_steps`` would lose its final steps.
    """

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)
