"""SIGKILL drill: kill ``lit-sftrl fit`` at random moments, resume with ``--ckpt_path last``, compare.

    python -m bench.kill_resume [--kills 10] [--max-steps 12] [--every 2] [--seed 0] [--tmpdir DIR]

A tiny GP-L SFT run (a tiny Mllama built offline, batch 1, one CPU thread) is started, killed with SIGKILL,
resumed, killed again... ``--kills`` times, then resumed to the end. Kill moments alternate between a random
time and the moment a checkpoint write is under way (a new file in the child's TMPDIR, where fsspec stages
Lightning's checkpoints before renaming them into place). After every kill, every ``*.ckpt`` of the run must
read back whole (zip CRCs, then a full ``torch.load``). The finished run is compared with one that was never
interrupted: same global step, same data position, same tokens seen and bit-identical trainable weights.

Lightning writes checkpoints atomically only when the staging file and the checkpoint folder share a
filesystem (``os.rename``); across filesystems ``shutil.move`` copies in place. ``--tmpdir /dev/shm`` (a tmpfs)
shows what a kill then leaves behind. ``tests/test_reliability.py`` imports this module for its single kill.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CORPUS = [  # tokenizer text for the tiny model (the tests' corpus)
    "You are playing the 24 game. Cards: A, 5, 10, K. Use each card once to reach 24.",
    '{"cards": ["A", "5", "10", "K"], "number": [1, 5, 10, 10], "formula": "(10 - 5) * 1 + 10 = 24"}',
    "You failed this trial because the formula evaluates to 23, not the target.",
    " ".join(str(i) for i in range(100)),
]

CONFIG = """\
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  precision: 32-true
  max_steps: {max_steps}
  limit_val_batches: 0
  num_sanity_val_steps: 0
  enable_progress_bar: false
  enable_model_summary: false
  log_every_n_steps: 1
  default_root_dir: {run}
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {run}, name: "", version: "", flush_logs_every_n_steps: 1}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{every_n_train_steps: {every}, save_last: true, save_top_k: -1}}
model:
  class_path: lit_sftrl.training.sft.SFTModule
  init_args:
    backbone: {{path: {model}, dtype: float32}}
    optim: {{lr: 1.0e-3, warmup_steps: 2, schedule: cosine}}
data:
  class_path: lit_sftrl.data.datamodules.SFTDataModule
  init_args:
    task: {{name: gp_l}}
    batch_size: 1
    num_workers: 0
    seed: 0
"""


def lit_sftrl_bin() -> str:
    return str(Path(sys.executable).with_name("lit-sftrl"))


def child_env(tmpdir: Path | None = None) -> dict[str, str]:
    """One thread per child: on a loaded 2-core machine two OpenMP threads make a step 10x slower."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore")
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    return env


def write_config(run: Path, model: Path, max_steps: int, every: int) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    path = run.parent / f"{run.name}.yaml"
    path.write_text(CONFIG.format(run=run, model=model, max_steps=max_steps, every=every))
    return path


def start_fit(config: Path, resume: bool, env: dict[str, str], log: Path) -> subprocess.Popen:
    args = [lit_sftrl_bin(), "fit", "--config", str(config)] + (["--ckpt_path", "last"] if resume else [])
    with open(log, "ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)


def checkpoint_steps(run: Path) -> list[int]:
    """Global steps of the step checkpoints written so far (``epoch=0-step=N.ckpt``)."""
    steps = []
    for path in (run / "checkpoints").glob("*step=*.ckpt"):
        try:
            steps.append(int(path.stem.rsplit("step=", 1)[1].split("-")[0]))
        except ValueError:
            pass
    return steps


def metric_rows(run: Path) -> list[dict[str, str]]:
    """Rows of metrics.csv that carry a training loss (a killed writer may leave a partial last line)."""
    import csv

    path = run / "metrics.csv"
    if not path.exists():
        return []
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    return [row for row in rows if row.get("train/loss") not in (None, "") and row.get("step", "").isdigit()]


def read_checkpoint_fully(path: Path) -> dict[str, Any]:
    """The whole file, CRCs verified first; raises with the file's name when it is damaged."""
    from lit_sftrl.models.export import check_lightning_checkpoint, read_lightning_checkpoint

    check_lightning_checkpoint(path)
    return read_lightning_checkpoint(path)


def unreadable_checkpoints(run: Path) -> list[str]:
    problems = []
    for path in sorted((run / "checkpoints").glob("*.ckpt")):
        try:
            read_checkpoint_fully(path)
        except Exception as error:  # noqa: BLE001 - each one is a finding
            problems.append(f"{path.name}: {error}")
    return problems


def kill_when(process: subprocess.Popen, ready: Any, timeout: float, poll: float = 0.02) -> bool:
    """SIGKILL ``process`` as soon as ``ready()`` holds; False if it ended (or timed out) first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if ready():
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(poll)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return False


def staging_write_under_way(tmpdir: Path, before: set[str]) -> Any:
    """A checkpoint is being staged: a new file appeared in the child's TMPDIR (fsspec's mkstemp)."""
    return lambda: bool({p.name for p in tmpdir.iterdir()} - before)


def random_moment_in_training(run: Path, delay: float) -> Any:
    """``delay`` seconds after this start logged its first training step (startup is not worth killing). A start
    replaces metrics.csv (Lightning's CSVLogger deletes the old one), so any row newer than the start is its own."""
    started, seen = time.time(), []

    def ready() -> bool:
        path = run / "metrics.csv"
        if not seen and path.exists() and path.stat().st_mtime > started and metric_rows(run):
            seen.append(time.monotonic())
        return bool(seen) and time.monotonic() - seen[0] >= delay

    return ready


@dataclass
class Drill:
    kills: list[str] = field(default_factory=list)  # how each kill landed
    damaged: list[str] = field(default_factory=list)  # unreadable checkpoints seen after kills
    leaked_tmp: int = 0  # staging files a kill left in TMPDIR
    runs: int = 0
    seconds: float = 0.0


def build_model(folder: Path) -> Path:
    from lit_sftrl.models.tiny import make_tiny

    path = folder / "tiny-mllama"
    if not path.exists():
        make_tiny(path, family="mllama", corpus=CORPUS)
    return path


def uninterrupted(folder: Path, model: Path, max_steps: int, every: int) -> tuple[Path, float]:
    """The reference run, and its seconds per training step (which scales the random kill moments)."""
    run = folder / "reference"
    config = write_config(run, model, max_steps, every)
    process = start_fit(config, False, child_env(), folder / "reference.log")
    first = None
    while process.poll() is None:
        if first is None and metric_rows(run):
            first = time.monotonic()
        time.sleep(0.05)
    if process.returncode:
        raise RuntimeError(f"the uninterrupted run failed; see {folder / 'reference.log'}")
    return run, (time.monotonic() - (first or time.monotonic())) / max(max_steps - 1, 1)


def killed_and_resumed(folder: Path, model: Path, max_steps: int, every: int, kills: int, seed: int,
                       step_seconds: float, tmpdir: Path | None = None) -> tuple[Path, Drill]:
    """Kill ``kills`` times (random moments ``step_seconds``-scaled, and during checkpoint writes), then finish."""
    rng = random.Random(seed)
    run = folder / "killed"
    config = write_config(run, model, max_steps, every)
    staging = Path(tmpdir or tempfile.mkdtemp(prefix="staging-", dir=folder))
    staging.mkdir(parents=True, exist_ok=True)
    env, log = child_env(staging), folder / "killed.log"
    drill, start = Drill(), time.monotonic()
    for attempt in range(kills + 20):
        resume = attempt > 0
        before = {p.name for p in staging.iterdir()}
        process = start_fit(config, resume, env, log)
        drill.runs += 1
        if len(drill.kills) < kills:
            if len(drill.kills) % 2 == 0:
                wait = rng.uniform(0.0, step_seconds * every * 1.5)
                landed = kill_when(process, random_moment_in_training(run, wait), timeout=300)
                how = f"{wait:.2f} s after the first step of this start"
            else:
                landed = kill_when(process, staging_write_under_way(staging, before), timeout=300, poll=0.005)
                how = "during a checkpoint write"
            if landed:
                drill.kills.append(how)
                drill.damaged += [f"after kill {len(drill.kills)} ({how}): {p}" for p in unreadable_checkpoints(run)]
                drill.leaked_tmp = len({p.name for p in staging.iterdir()})
                continue
        else:
            process.wait()
        if process.returncode == 0 and (run / "checkpoints" / "last.ckpt").exists():
            if read_checkpoint_fully(run / "checkpoints" / "last.ckpt")["global_step"] >= max_steps:
                break
        elif process.returncode not in (0, None, -signal.SIGKILL):
            raise RuntimeError(f"a run failed (exit {process.returncode}); see {log}")
    drill.seconds = time.monotonic() - start
    return run, drill


def compare(reference: Path, resumed: Path) -> dict[str, Any]:
    """The finished runs side by side: steps, data position, tokens, trainable weights."""
    a = read_checkpoint_fully(reference / "checkpoints" / "last.ckpt")
    b = read_checkpoint_fully(resumed / "checkpoints" / "last.ckpt")
    data_key = next(k for k in a if k.endswith("SFTDataModule"))
    differing = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    max_diff = max((float((a["state_dict"][k] - b["state_dict"][k]).abs().max()) for k in differing), default=0.0)
    return {
        "global_step": (a["global_step"], b["global_step"]),
        "batches_consumed": (a[data_key]["batches_consumed"], b[data_key]["batches_consumed"]),
        "tokens_seen": (a.get("tokens_seen"), b.get("tokens_seen")),
        "tensors": len(a["state_dict"]),
        "differing_tensors": len(differing),
        "max_abs_diff": max_diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=24)
    parser.add_argument("--every", type=int, default=2, help="every_n_train_steps of the checkpoint callback")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tmpdir", type=Path, default=None, help="the children's TMPDIR (fsspec's staging folder)")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="kill_resume-"))
    folder.mkdir(parents=True, exist_ok=True)
    model = build_model(folder)
    start = time.monotonic()
    reference, step_seconds = uninterrupted(folder, model, args.max_steps, args.every)
    print(f"uninterrupted run: {time.monotonic() - start:.0f} s ({step_seconds:.2f} s per step)")
    resumed, drill = killed_and_resumed(folder, model, args.max_steps, args.every, args.kills, args.seed, step_seconds,
                                        args.tmpdir)
    result = compare(reference, resumed)
    print(f"killed {len(drill.kills)} times over {drill.runs} starts in {drill.seconds:.0f} s")
    for index, how in enumerate(drill.kills, 1):
        print(f"  kill {index}: {how}")
    print(f"damaged checkpoints seen after kills: {len(drill.damaged)}")
    for line in drill.damaged[:10]:
        print(f"  {line}")
    print(f"staging files left in TMPDIR by kills: {drill.leaked_tmp}")
    for key, value in result.items():
        print(f"{key:>18}: {value}")
    ok = (not drill.damaged and result["global_step"][0] == result["global_step"][1] == args.max_steps
          and result["batches_consumed"][0] == result["batches_consumed"][1] and result["differing_tensors"] == 0)
    print("OK: resumed run identical to the uninterrupted one" if ok else "FAILED")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
