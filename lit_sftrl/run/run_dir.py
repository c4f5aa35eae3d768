"""A run directory has one writer at a time, keeps its fit's config, and starts clean.

Two fits (or a fit and an evaluation) writing into one directory interleave ``metrics.csv`` and overwrite each
other's evaluation records and checkpoints. An advisory lock (``flock``) on ``<run>/.lock`` refuses the second
one with a message naming the first; the kernel releases it when its holder exits, even on SIGKILL, so a crashed
run never leaves a stale lock. Holding the lock also proves that temporary checkpoint files left in the
directory are orphans of a killed writer, so they are removed then.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import SaveConfigCallback

LOCK_FILE = ".lock"
TEMPORARY_PATTERNS = (".*.tmp", ".*.tmp-*")  # AtomicCheckpointIO's staging names


class RunDirectoryBusy(RuntimeError):
    """Another process holds the run directory."""


class RunDirectoryLock:
    """An exclusive, non-blocking ``flock`` on ``<run_dir>/.lock`` that records who holds it."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, command: str = "") -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirectoryBusy(
                f"run directory {str(self.run_dir)!r} is in use by {holder}: wait for it to end, or choose another "
                "--trainer.default_root_dir"
            ) from None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": command or " ".join(sys.argv),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunDirectoryLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        record = {}
    if not record.get("pid"):
        return "another process"
    return (f"process {record['pid']} on {record.get('host', '?')} "
            f"({record.get('command', '?')}, since {record.get('since', '?')})")


def remove_orphan_temporaries(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the staging files a killed checkpoint or export write left behind; call only while holding the lock."""
    removed = []
    folder = Path(run_dir) / "checkpoints"
    for pattern in TEMPORARY_PATTERNS:
        for path in folder.glob(pattern) if folder.is_dir() else ():
            if path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


class RunConfigCallback(SaveConfigCallback):
    """LightningCLI's config saver that keeps a fit's ``config.yaml``: ``validate`` and ``test`` into the same run
    directory write ``config-validate.yaml`` / ``config-test.yaml`` instead of replacing the record of how the
    weights were trained."""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        stage = getattr(stage, "value", stage)  # Lightning passes a TrainerFn enum
        if stage != "fit":
            self.config_filename = f"config-{stage}.yaml"
        super().setup(trainer, pl_module, stage)


# ----------------------------------------------------------------------------------------------- one run directory

# Loggers whose files go to save_dir/name/version: with name and version empty, they write into the run directory.
_VERSIONED_LOGGERS = ("CSVLogger", "TensorBoardLogger")
DEFAULT_LOGGER = "lit_sftrl.run.run_logger.RunCSVLogger"


def place_in_run_directory(trainer: Any) -> None:
    """Make ``trainer.default_root_dir`` the one key that places a run (a parsed ``trainer`` config, changed in
    place): every logger writes there whatever its ``save_dir`` said (``--trainer.default_root_dir X`` alone used
    to leave metrics and checkpoints in the config's directory), the default logger is the CSV one, and without a
    logger the callbacks that need one are dropped (``--trainer.logger false`` used to crash)."""
    root = trainer.get("default_root_dir")
    if root is None:  # Lightning's own layout (versioned folders under the working directory)
        return
    logger = trainer.get("logger")
    if logger is None or logger is True:
        from jsonargparse import Namespace

        trainer["logger"] = Namespace(
            class_path=DEFAULT_LOGGER, init_args=Namespace(save_dir=root, name="", version="")
        )
        return
    if logger is False:
        callbacks = trainer.get("callbacks") or []
        trainer["callbacks"] = [
            c for c in callbacks if not str(_get(c, "class_path") or "").endswith("LearningRateMonitor")
        ]
        return
    for entry in logger if isinstance(logger, list) else [logger]:
        init_args = _get(entry, "init_args")
        if init_args is None:
            continue
        init_args["save_dir"] = root
        if str(_get(entry, "class_path")).endswith(_VERSIONED_LOGGERS):
            init_args["name"], init_args["version"] = "", ""


def _get(node: Any, key: str) -> Any:
    return node.get(key) if hasattr(node, "get") else getattr(node, key, None)


def previous_run_files(run_dir: str | os.PathLike) -> list[str]:
    """What another run left in ``run_dir`` (the lock file and empty folders aside)."""
    folder = Path(run_dir)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir()
                  if p.name != LOCK_FILE and not (p.is_dir() and not p.is_symlink() and not any(p.iterdir())))


# What a run writes into its directory, by name: the only things ``--overwrite true`` may delete. Files at the top
# (configs, logs), and folders whose every entry matches their patterns (wandb's folder is the logger's own).
RUN_FILES = ("config.yaml", "config-*.yaml", "metrics.csv", "hparams.yaml", "events.out.tfevents.*", LOCK_FILE)
RUN_FOLDERS = {
    "checkpoints": ("*.ckpt", *TEMPORARY_PATTERNS),
    "eval": ("*.json", "*.transcripts.jsonl", ".*.tmp", ".*.tmp-*"),
    "wandb": ("*",),
}
DISTRIBUTED_CHECKPOINT_FILES = ("*.distcp", "meta.pt", ".metadata")  # inside a checkpoints/<name>.ckpt/ folder


def foreign_files(run_dir: str | os.PathLike) -> list[str]:
    """Entries of ``run_dir`` that no run writes (``.ssh``, ``Documents``, a repository's sources...), as paths
    relative to it; symbolic links count as foreign, whatever their name (deleting through one reaches elsewhere)."""
    folder = Path(run_dir)
    if not folder.is_dir():
        return []
    foreign = []
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink():
            foreign.append(entry.name)
        elif entry.is_dir() and entry.name in RUN_FOLDERS:
            foreign += [f"{entry.name}/{name}" for name in _foreign_in(entry, RUN_FOLDERS[entry.name])]
        elif not (entry.is_file() and any(entry.match(pattern) for pattern in RUN_FILES)):
            foreign.append(entry.name + ("/" if entry.is_dir() else ""))
    return foreign


def _foreign_in(folder: Path, patterns: tuple[str, ...]) -> list[str]:
    if patterns == ("*",):
        return []
    foreign = []
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink():
            foreign.append(entry.name)
        elif entry.is_dir() and folder.name == "checkpoints" and entry.suffix == ".ckpt":
            if any(inner.is_symlink() or not any(inner.match(p) for p in DISTRIBUTED_CHECKPOINT_FILES)
                   for inner in entry.iterdir()):
                foreign.append(entry.name + "/")
        elif not (entry.is_file() and any(entry.match(pattern) for pattern in patterns)):
            foreign.append(entry.name + ("/" if entry.is_dir() else ""))
    return foreign


def clear_run_directory(run_dir: str | os.PathLike) -> None:
    """Delete a previous run's files (``--overwrite true``); call only while holding the lock. A folder that holds
    anything a run does not write is refused, nothing deleted: ``--trainer.default_root_dir .`` or ``~`` with
    ``--overwrite true`` used to wipe a repository or a home folder."""
    import shutil

    foreign = foreign_files(run_dir)
    if foreign:
        shown = ", ".join(foreign[:6]) + (f" and {len(foreign) - 6} more" if len(foreign) > 6 else "")
        raise ValueError(f"--overwrite true deletes only a run's own files, and {str(run_dir)!r} also holds {shown}: "
                         "choose a run directory of its own (or move those away); nothing was deleted")
    for name in previous_run_files(run_dir):
        path = Path(run_dir) / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


# ----------------------------------------------------------------------------------------------- resuming a run

# Settings that do not change what a resumed run trains: where and how often it logs, evaluates and checkpoints,
# where it stops (``--trainer.max_steps 2`` on a resume is how a run is trained longer), and the learning rate
# (the documented way on after a non-finite stop; ``use_configured_optimizer_settings`` applies it on purpose).
# Keys are dotted without ``init_args``; a prefix covers everything below it.
RESUME_NEUTRAL_KEYS = (
    "config", "ckpt_path", "overwrite", "allow_config_change", "trainer.default_root_dir", "trainer.logger",
    "trainer.callbacks", "trainer.max_steps", "trainer.max_epochs", "trainer.max_time", "trainer.enable_progress_bar",
    "trainer.enable_model_summary", "trainer.log_every_n_steps", "trainer.limit_val_batches",
    "trainer.limit_test_batches", "trainer.val_check_interval", "trainer.check_val_every_n_epoch",
    "trainer.num_sanity_val_steps", "trainer.enable_checkpointing", "trainer.profiler", "trainer.plugins",
    "model.eval_sampling", "model.save_transcripts", "model.max_nonfinite_losses", "model.optim.lr",
    "data.evaluation", "data.num_workers",
)


def flat_config(node: Any, prefix: str = "") -> dict[str, Any]:
    """A config as ``{dotted.key: value}``, ``init_args`` levels left out (``model.optim.lr``, as users write
    it); a list is one value."""
    flat: dict[str, Any] = {}
    if isinstance(node, dict):
        for key, value in node.items():
            dotted = prefix if key == "init_args" else f"{prefix}{key}."
            flat |= flat_config(value, dotted)
        return flat
    return {prefix.rstrip("."): node}


def changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The keys whose values differ between two configs (as :func:`flat_config` writes them), those in
    :data:`RESUME_NEUTRAL_KEYS` aside, each as ``key: old -> new``."""
    old, new = flat_config(saved), flat_config(current)
    changes = []
    for key in sorted(old.keys() | new.keys()):
        if any(key == neutral or key.startswith(neutral + ".") for neutral in RESUME_NEUTRAL_KEYS):
            continue
        before, after = old.get(key, "(absent)"), new.get(key, "(absent)")
        if before != after:
            changes.append(f"{key}: {before!r} -> {after!r}")
    return changes


def keep_previous_config(run_dir: str | os.PathLike) -> Path | None:
    """Move ``config.yaml`` aside as ``config-before-resume-<n>.yaml`` (the fit then writes the new one), so a run
    resumed under another config records both; returns where it went."""
    config = Path(run_dir) / "config.yaml"
    if not config.is_file():
        return None
    number = 1
    while (kept := config.with_name(f"config-before-resume-{number}.yaml")).exists():
        number += 1
    os.replace(config, kept)
    return kept


def run_directory(trainer: Any) -> Path:
    """Where a run's outputs live: the logger's directory (``checkpoints/<run>`` in the configs), else the
    trainer's ``default_root_dir``. The one rule every writer of a run's files follows."""
    return Path(trainer.log_dir or trainer.default_root_dir)
