"""A CSV logger whose ``metrics.csv`` survives ``--ckpt_path`` resumes.

Lightning's CSVLogger deletes an existing ``metrics.csv`` when a logger starts in a non-empty folder, which is
exactly what resuming a killed run into its own run directory does: the loss history before the kill would be
lost. This one appends instead. Steps that a killed run logged after its last checkpoint appear twice (the
resumed run replays them); the later row of a step is the one that counts.
"""

from __future__ import annotations

import csv
import os

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _AppendingWriter(ExperimentWriter):
    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        """Lightning rewrites the whole file in place when a new column appears: a full disk (or a kill) during
        that write truncated the run's history. Written beside it and renamed instead (local files)."""
        if "://" in str(self.metrics_file_path):
            return super()._rewrite_with_new_header(fieldnames)
        with open(self.metrics_file_path, newline="") as file:
            rows = list(csv.DictReader(file))
        temporary = f"{self.metrics_file_path}.{os.getpid()}.tmp"
        try:
            with open(temporary, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=fieldnames)
                writer.writeheader()
                writer.writerows(rows)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.metrics_file_path)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):  # keep the file and adopt its columns
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = sorted(next(csv.reader(file), []))


class RunCSVLogger(CSVLogger):
    """``CSVLogger`` that appends to the run directory's ``metrics.csv`` instead of deleting it."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
