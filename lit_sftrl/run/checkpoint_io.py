"""Checkpoints that lose no work: atomic writes on any filesystem layout, and a save when training ends.

Lightning's default writer stages the file in ``$TMPDIR`` and moves it into place; when ``$TMPDIR`` is on
another filesystem than the checkpoints (local /tmp, network storage: the usual cluster layout), that move is a
copy, and a kill during it leaves a truncated checkpoint. Here the temporary file sits beside the target, is
flushed to disk, and ``os.replace`` (atomic within one filesystem) puts it in place.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from lit_sftrl.core.disk import space_checked


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves go to a temporary name in the same folder, then an atomic rename."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if "://" in str(path):  # remote storage: keep Lightning's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        write_atomically(Path(path), lambda file: torch.save(checkpoint, file))


def write_atomically(path: Path, write: Any) -> None:
    """``write(file)`` into a temporary file beside ``path``, flushed to disk, then renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    advice = "free some space, then resume with --ckpt_path last (earlier checkpoints are whole)"
    try:
        with space_checked(path.parent, f"writing checkpoint {path}", advice):
            with open(temporary, "wb") as file:
                write(file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also saves when training stops between two periodic saves, or on Ctrl-C.

    Lightning's writes ``last.ckpt`` at the end of training only if it never wrote one, so a run whose
    ``max_steps`` is not a multiple of ``every_n_train_steps`` would lose its final steps. On Ctrl-C Lightning
    shuts down without saving, and ``--ckpt_path last`` then resumed from an older checkpoint or from step 0;
    here the state after the last completed optimizer step becomes ``last.ckpt``.
    """

    # A module whose training step is a whole update (PPO: rollout, then several optimizer steps) sets
    # ``redo_interrupted_update = True``: an interrupted update cannot be saved half done (its first optimizer steps
    # taken, its episodes advanced), so the state after the last finished update is kept in memory (the bytes of
    # the checkpoint Lightning would write then) and becomes last.ckpt on Ctrl-C; the resume redoes the update.
    # Not kept when larger than this: Ctrl-C then saves nothing and the last periodic checkpoint stands.
    MAX_UPDATE_SNAPSHOT_BYTES = 4 << 30
    _update_snapshot: tuple[int, bytes] | None = None  # (finished updates, checkpoint bytes)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if getattr(pl_module, "redo_interrupted_update", False) and self.save_last:
            self._update_snapshot = None
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            size = sum(t.nbytes for t in _tensors(checkpoint))
            if size <= self.MAX_UPDATE_SNAPSHOT_BYTES:
                buffer = io.BytesIO()
                torch.save(checkpoint, buffer)
                self._update_snapshot = (trainer.current_epoch + 1, buffer.getvalue())

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if (
            isinstance(exception, KeyboardInterrupt) and self.save_last
            and not self._should_skip_saving_checkpoint(trainer)
        ):
            if getattr(pl_module, "redo_interrupted_update", False):
                self._save_last_finished_update(trainer)
                return
            with _as_if_saved_at_batch_end(trainer):
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            rank_zero_info(f"interrupted at step {trainer.global_step}: saved {self.last_model_path}; "
                           "resume with --ckpt_path last")

    def _save_last_finished_update(self, trainer: Any) -> None:
        if self._update_snapshot is None:
            rank_zero_info("interrupted before an update of this run finished: nothing saved (a half-done update "
                           "cannot be resumed exactly); the run's earlier checkpoints, if any, are unchanged")
            return
        updates, data = self._update_snapshot
        path = Path(self.last_model_path or self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST))
        if trainer.is_global_zero:
            write_atomically(path, lambda file: file.write(data))
        self.last_model_path = str(path)
        rank_zero_info(f"interrupted in update {updates + 1}: saved the state after update {updates} to {path}; "
                       "--ckpt_path last redoes the interrupted update")

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)


@contextmanager
def _as_if_saved_at_batch_end(trainer: Any) -> Iterator[None]:
    """Record the loop's progress as Lightning's own step checkpoints do (saved in ``on_train_batch_end`` of the
    last completed batch). Lightning's resume logic assumes that moment: from a batch that had only started, it
    would count one batch too many and log every later step one step late."""
    loop = trainer.fit_loop.epoch_loop
    total, current = loop.batch_progress.total, loop.batch_progress.current
    interrupted_in_a_step = (trainer.accumulate_grad_batches == 1 and total.processed == total.completed
                             and total.started == total.ready == total.completed + 1)
    if not interrupted_in_a_step:
        yield
        return
    saved = ([vars(total).copy(), vars(current).copy()], loop._batches_that_stepped)
    for progress in (total, current):
        progress.ready = progress.started = progress.processed = progress.completed
        progress.completed -= 1
    loop._batches_that_stepped -= 1
    try:
        yield
    finally:
        for progress, values in zip((total, current), saved[0]):
            vars(progress).update(values)
        loop._batches_that_stepped = saved[1]


def _tensors(node: Any) -> Iterator[torch.Tensor]:
    if isinstance(node, torch.Tensor):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _tensors(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _tensors(value)


def use_configured_optimizer_settings(checkpoint: dict[str, Any], groups: list[dict[str, Any]]) -> None:
    """Make a resumed run use the config's learning rate, weight decay and betas (``groups``: one dict per
    parameter group), not the checkpoint's, keeping where the schedule stands.

    Lightning restores the optimizer's and the scheduler's state dicts as saved, learning rates included, so
    ``--ckpt_path X --model.init_args.optim.lr <lower>`` (the advice after a non-finite stop) silently trained on
    at the old rate. Each group's rates are rescaled by new/old peak rate; a checkpoint whose groups do not match
    the config's is left alone (Lightning then reports the mismatch itself)."""
    optimizers, schedulers = checkpoint.get("optimizer_states") or [], checkpoint.get("lr_schedulers") or []
    if len(optimizers) != 1 or len(optimizers[0].get("param_groups", [])) != len(groups):
        return
    ratios = []
    for saved, wanted in zip(optimizers[0]["param_groups"], groups):
        old = saved.get("initial_lr", saved["lr"])
        ratio = wanted["lr"] / old if old else 1.0
        ratios.append(ratio)
        saved["lr"] *= ratio
        if "initial_lr" in saved:
            saved["initial_lr"] = wanted["lr"]
        for key in ("weight_decay", "betas"):
            if key in wanted and key in saved:
                saved[key] = type(saved[key])(wanted[key]) if key == "betas" else wanted[key]
    for scheduler in schedulers:
        for key in ("base_lrs", "_last_lr"):
            if len(scheduler.get(key) or []) == len(ratios):
                scheduler[key] = [value * ratio for value, ratio in zip(scheduler[key], ratios)]
