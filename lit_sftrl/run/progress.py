"""Progress a user can read, and a model summary without numbers that mean nothing here.

Lightning's bar counts batches: one per PPO update and one per chunk of evaluation episodes, so a CPU run showed
nothing for minutes (the sanity evaluation's bar is even hidden). :class:`RunProgressBar` is Lightning's rich
bar plus *phases* reported from inside a step: the attempts of a rollout, the attempts of a PPO update's
optimisation, the episodes (and attempts) of an evaluation. Rich draws nothing until the end when its console is
not a terminal (a log file, CI), so there every phase, training included, writes a plain line instead, every
10 % of it (at most every 5 s) or every 30 s, and when it ends.

Lightning's model summary ends with ``Total FLOPs: 0`` (its counter needs an example input, which a policy over
conversations has none of); this project counts FLOPs per processed token (``train/flops``, ``eval/*.json``),
so :class:`RunModelSummary` leaves that column and line out.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from typing import Any

from lightning.pytorch.callbacks import ModelSummary, RichModelSummary, RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.model_summary import get_formatted_model_size, get_human_readable_count


def _duration(seconds: float) -> str:
    if seconds < 100:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


class Phase:
    """One phase's progress (``advance(n)`` as work finishes, ``close()`` at its end), shown as a rich task,
    as plain lines through ``write``, or not at all."""

    def __init__(self, label: str, total: float, unit: str, *, progress: Any = None,
                 write: Callable[[str], None] | None = None, done: int = 0, every_s: float = 30.0) -> None:
        self.label, self.total, self.unit, self.done = label, total, unit, done
        self.note = ""
        self._progress, self._write, self._every_s = progress, write, every_s
        self._task = progress.add_task(label, total=total, completed=done) if progress is not None else None
        self._start = self._last_line = time.monotonic()
        self._last_done = done

    def advance(self, n: int = 1, note: str = "") -> None:
        self.update(self.done + n, note)

    def update(self, done: int, note: str = "") -> None:
        self.done, self.note = done, note or self.note
        if self._task is not None:
            label = f"{self.label} ({self.note})" if self.note else self.label
            self._progress.update(self._task, completed=done, description=label)
        elif self._write is not None:
            now = time.monotonic()
            if self._line_due(now):
                self._line(now)

    def _line_due(self, now: float) -> bool:
        since = now - self._last_line
        tenth = self.total / 10 if math.isfinite(self.total) and self.total > 0 else math.inf
        return (self.done - self._last_done >= tenth and since >= 5.0) or since >= self._every_s

    def _line(self, now: float) -> None:
        elapsed = now - self._start
        total = f"/{self.total:.0f}" if math.isfinite(self.total) else ""
        line = f"{self.label} {self.done}{total} {self.unit}"
        line += f", {self.note}" if self.note else ""
        line += f", {_duration(elapsed)}"
        if math.isfinite(self.total) and 0 < self.done < self.total:
            line += f", ETA {_duration(elapsed / self.done * (self.total - self.done))}"
        self._write(line)
        self._last_line, self._last_done = now, self.done

    def close(self) -> None:
        if self._task is not None:
            self._progress.remove_task(self._task)
            self._task = None
        elif self._write is not None and self.done != self._last_done:
            self._line(time.monotonic())
        self._write = None

    def __enter__(self) -> Phase:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class RunProgressBar(RichProgressBar):
    """Lightning's rich progress bar with phases (:meth:`phase`), an epoch bar that names PPO updates (it read
    ``Epoch 0/-2`` whenever ``max_epochs`` was unset), and plain lines instead of bars off a terminal."""

    def __init__(self, *args: Any, write: Callable[[str], None] = _stderr, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._write = write
        self._interactive: bool | None = None
        self._train: Phase | None = None
        self._eval: Phase | None = None
        self._eval_attempts = 0

    @property
    def interactive(self) -> bool:
        if self._interactive is None:
            from rich.console import Console

            self._interactive = Console(**self._console_kwargs).is_interactive
        return self._interactive

    @property
    def showing(self) -> bool:
        """Whether progress shows at all (rank 0, not switched off), as bars or as lines."""
        return self._enabled and self.refresh_rate > 0

    @property
    def is_enabled(self) -> bool:  # rich's bars only on a terminal; lines are this class's own
        return self.showing and self.interactive

    def phase(self, label: str, total: float, unit: str, done: int = 0) -> Phase:
        if not self.showing:
            return Phase(label, total, unit, done=done)
        if self.interactive and self.progress is not None:
            return Phase(label, total, unit, progress=self.progress, done=done)
        return Phase(label, total, unit, write=self._write, done=done)

    def eval_attempts(self, n: int) -> None:
        """``on_attempts`` of the evaluation engine: attempts show beside the episodes done, which move only
        when a whole chunk of episodes ends."""
        self._eval_attempts += n
        if self._eval is not None:
            self._eval.update(self._eval.done, f"{self._eval_attempts} attempts")

    def _get_train_description(self, current_epoch: int) -> str:
        module = self.trainer.lightning_module
        if not module.automatic_optimization:  # PPO: one epoch is one update
            return f"Update {current_epoch + 1}/{self.trainer.max_epochs}"
        if self.trainer.max_epochs in (None, -1):  # a run bounded by max_steps
            return f"Epoch {current_epoch}"
        return super()._get_train_description(current_epoch)

    # ----------------------------------------------------------------------- training lines (off a terminal)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        if self.showing and not self.interactive:
            if pl_module.automatic_optimization:
                self._train = self.phase("train", trainer.estimated_stepping_batches, "steps", trainer.global_step)
            else:
                self._train = self.phase("train", trainer.max_epochs, "updates", trainer.current_epoch)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        if self._train is not None and pl_module.automatic_optimization:
            self._train.update(trainer.global_step, self._metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._train is not None and not pl_module.automatic_optimization:
            self._train.update(trainer.current_epoch + 1, self._metrics(trainer, pl_module))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_end(trainer, pl_module)
        if self._train is not None:
            self._train.close()
            self._train = None

    def _metrics(self, trainer: Any, pl_module: Any) -> str:
        shown = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())

    # ----------------------------------------------------------------------- evaluation phases

    def _start_eval(self, trainer: Any, loaders: Any, batches: Any) -> None:
        loaders = loaders if isinstance(loaders, list) else [loaders] if loaders is not None else []
        total = 0
        for loader, n in zip(loaders, batches or []):
            chunks = getattr(loader.dataset, "chunks", [])
            total += sum(len(chunk.episodes) for chunk in chunks[: int(min(n, len(chunks)))])
        self._eval = self.phase("evaluation", total, "episodes")
        self._eval_attempts = 0

    def _end_eval(self) -> None:
        if self._eval is not None:
            self._eval.close()
            self._eval = None

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_validation_start(trainer, pl_module)
        batches = trainer.num_sanity_val_batches if trainer.sanity_checking else trainer.num_val_batches
        self._start_eval(trainer, trainer.val_dataloaders, batches)

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_test_start(trainer, pl_module)
        self._start_eval(trainer, trainer.test_dataloaders, trainer.num_test_batches)

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, *args: Any) -> None:
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, *args)
        if self._eval is not None:
            self._eval.advance(len(getattr(batch, "episodes", ())))

    on_test_batch_end = on_validation_batch_end

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        self._end_eval()
        super().on_validation_end(trainer, pl_module)

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        self._end_eval()
        super().on_test_end(trainer, pl_module)


def phase(trainer: Any, label: str, total: float, unit: str) -> Phase:
    """A phase on the trainer's :class:`RunProgressBar`; a silent one without it (no trainer, bar switched off)."""
    bar = getattr(trainer, "progress_bar_callback", None) if trainer is not None else None
    return bar.phase(label, total, unit) if isinstance(bar, RunProgressBar) else Phase(label, total, unit)


def eval_attempts(trainer: Any) -> Callable[[int], None] | None:
    bar = getattr(trainer, "progress_bar_callback", None) if trainer is not None else None
    return bar.eval_attempts if isinstance(bar, RunProgressBar) else None


class RunModelSummary(ModelSummary):
    """Lightning's model summary without the FLOPs column and its ``Total FLOPs: 0`` line, nor the count of
    modules in train/eval mode; what is left says what will train."""

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int = 0,
                  **summarize_kwargs: Any) -> None:
        kept = ("Name", "Type", "Params", "Params per Device")
        columns = [(name, values) for name, values in summary_data if name in kept]
        rows = list(zip(*(values for _, values in columns)))
        widths = [max(len(name), *(len(str(v)) for v in values)) for name, values in columns]
        lines = ["  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths)) for row in [[n for n, _ in columns], *rows]]
        lines += [f"{get_human_readable_count(trainable_parameters)} trainable parameters of "
                  f"{get_human_readable_count(total_parameters)}, {get_formatted_model_size(model_size)} MB"]
        logging.getLogger(ModelSummary.__module__).info("\n".join(lines))


def use_run_callbacks(trainer: Any) -> None:
    """Put the run's progress bar and model summary in place of Lightning's defaults (not of a user's own
    subclass), keeping their settings."""
    for index, callback in enumerate(trainer.callbacks):
        if type(callback) in (RichProgressBar, TQDMProgressBar):
            trainer.callbacks[index] = RunProgressBar(**_rich_settings(callback))
        elif type(callback) in (ModelSummary, RichModelSummary):
            trainer.callbacks[index] = RunModelSummary(max_depth=callback._max_depth)


def _rich_settings(callback: Any) -> dict[str, Any]:
    if isinstance(callback, RichProgressBar):
        return {"refresh_rate": callback.refresh_rate, "leave": callback._leave, "theme": callback.theme,
                "console_kwargs": callback._console_kwargs}
    return {"refresh_rate": callback.refresh_rate, "leave": callback._leave}
