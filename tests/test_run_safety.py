"""Nothing is lost: non-finite weights are caught and never saved, one writer per run directory, evaluation keeps
the fit's config, Ctrl-C saves a resumable checkpoint, orphan temporaries are cleaned up."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from lit_sftrl.models.export import read_lightning_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import kill_resume  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tiny_dir_factory) -> Path:
    return tiny_dir_factory("mllama")


def _config(tmp_path: Path, model: Path, max_steps: int, every: int, name: str = "run") -> tuple[Path, Path]:
    """The drill config with the project's RunCheckpoint (what configs/ use)."""
    run = tmp_path / name
    path = kill_resume.write_config(run, model, max_steps, every)
    path.write_text(
        path.read_text().replace("lightning.pytorch.callbacks.ModelCheckpoint", "lit_sftrl.checkpoint_io.RunCheckpoint")
    )
    return run, path


def _fit(config: Path, *extra: str):
    from lit_sftrl.cli import run

    return run(["fit", "--config", str(config), *extra])


def _poison_weights_at(monkeypatch, step: int) -> None:
    """The optimizer step number ``step`` (1-based) leaves a NaN in the weights, whatever the loss."""
    original, count = torch.optim.AdamW.step, [0]

    def poisoned(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        count[0] += 1
        if count[0] == step:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)


def test_nonfinite_weights_after_a_step_stop_the_run_and_are_never_saved(tmp_path, model_dir, monkeypatch):
    run_dir, config = _config(tmp_path, model_dir, max_steps=6, every=2)
    _poison_weights_at(monkeypatch, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(FloatingPointError, match=r"weights turned non-finite .* at step 3") as error:
            _fit(config)
    assert "last.ckpt" in str(error.value) and "--ckpt_path" in str(error.value) and "\n" not in str(error.value)
    saved = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    assert saved, "the step-2 checkpoint exists"
    for path in saved:
        checkpoint = read_lightning_checkpoint(path)
        assert checkpoint["global_step"] <= 2, path
        assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values()), path


def test_ctrl_c_saves_a_checkpoint_that_resumes(tmp_path, model_dir, monkeypatch):
    """KeyboardInterrupt in the 4th step: last.ckpt holds step 3 and --ckpt_path last continues from there
    (before, nothing was saved and the resume restarted silently at step 0)."""
    from lit_sftrl.sft import SFTModule

    run_dir, config = _config(tmp_path, model_dir, max_steps=5, every=100)
    original, calls = SFTModule.training_step, [0]

    def interrupted(self, batch, batch_idx):
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt
        return original(self, batch, batch_idx)

    monkeypatch.setattr(SFTModule, "training_step", interrupted)
    handler = signal.getsignal(signal.SIGINT)  # Lightning ignores SIGINT while it shuts down
    try:
        with pytest.raises(SystemExit):
            _fit(config)
    finally:
        signal.signal(signal.SIGINT, handler)
    monkeypatch.undo()
    last = read_lightning_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 3 and last["SFTDataModule"] == {"batches_consumed": 3}
    resumed = _fit(config, "--ckpt_path", "last")
    assert resumed.trainer.global_step == 5
    rows = {int(r["step"]) for r in kill_resume.metric_rows(run_dir)}
    assert min(rows) == 3, rows  # the resumed run started where the interrupted one stopped


def test_a_second_writer_is_refused_naming_the_first(tmp_path, model_dir):
    """Another process holds the run directory (as a running fit does): the fit is refused at once, nothing
    written; once that process is gone (even killed) the directory is free again."""
    from lit_sftrl.cli import run

    run_dir, config = _config(tmp_path, model_dir, max_steps=1, every=1)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from lit_sftrl.run_dir import RunDirectoryLock; "
        f"RunDirectoryLock({str(run_dir)!r}).acquire('lit-sftrl fit (the first one)'); "
        "print('held', flush=True); time.sleep(120)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for command in ("fit", "validate"):
            with pytest.raises(SystemExit) as exit_info:
                run([command, "--config", str(config)])
            message = str(exit_info.value.code)
            assert (
                f"process {holder.pid}" in message and "the first one" in message and str(run_dir) in message
            ), message
        assert not (run_dir / "metrics.csv").exists() and not (run_dir / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    from lit_sftrl.run_dir import RunDirectoryLock

    with RunDirectoryLock(run_dir):  # a killed holder leaves no stale lock
        pass


def test_evaluation_keeps_the_fit_config_and_orphans_are_cleaned(tmp_path, model_dir):
    from lit_sftrl.cli import run

    run_dir, config = _config(tmp_path, model_dir, max_steps=1, every=1)
    orphan = run_dir / "checkpoints" / ".last.ckpt.4242.tmp"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"half a checkpoint")
    _fit(config)
    assert not orphan.exists()
    fit_config = (run_dir / "config.yaml").read_text()
    start = time.time()
    run(["validate", "--config", str(config), "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"),
         "--trainer.limit_val_batches", "1", "--data.init_args.evaluation.val_episodes", "2",
         "--model.init_args.eval_sampling.max_new_tokens", "4"])
    assert (run_dir / "config.yaml").read_text() == fit_config
    assert (run_dir / "config-validate.yaml").stat().st_mtime >= start - 1
