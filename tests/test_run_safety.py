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

from bench import kill_resume
from lit_sftrl.models.export import read_lightning_checkpoint


@pytest.fixture(scope="module")
def model_dir(tiny_dir_factory) -> Path:
    return tiny_dir_factory("mllama")


def _config(tmp_path: Path, model: Path, max_steps: int, every: int, name: str = "run") -> tuple[Path, Path]:
    """The drill config with the project's RunCheckpoint (what configs/ use)."""
    run = tmp_path / name
    path = kill_resume.write_config(run, model, max_steps, every)
    path.write_text(
        path.read_text().replace("lightning.pytorch.callbacks.ModelCheckpoint",
                                 "lit_sftrl.run.checkpoint_io.RunCheckpoint")
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


def test_nonfinite_weights_after_a_step_stop_with_the_state_before_it_which_resumes_at_a_lower_lr(
    tmp_path, model_dir, monkeypatch
):
    """Step 3 turns a weight NaN (the loss was finite): the run stops in one line naming nonfinite-stop.ckpt,
    which holds the state before step 3 (weights and optimizer moments equal to the step-2 checkpoint's, data
    position 2), and resuming from it with a lower learning rate trains to the end at that rate. Before, no
    stop checkpoint was written, and a resume kept the checkpoint's learning rate whatever the config said."""
    run_dir, config = _config(tmp_path, model_dir, max_steps=5, every=2)
    _poison_weights_at(monkeypatch, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(FloatingPointError, match=r"weights turned non-finite .* at step 3") as error:
            _fit(config)
    stop = run_dir / "checkpoints" / "nonfinite-stop.ckpt"
    message = str(error.value)
    assert str(stop) in message and "--ckpt_path" in message and "\n" not in message, message
    for path in sorted((run_dir / "checkpoints").glob("*.ckpt")):
        checkpoint = read_lightning_checkpoint(path)
        assert checkpoint["global_step"] <= 2, path
        assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values()), path
    saved, before = read_lightning_checkpoint(stop), read_lightning_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == before["global_step"] == 2
    assert saved["SFTDataModule"] == before["SFTDataModule"] == {"batches_consumed": 2}
    assert saved["state_dict"].keys() == before["state_dict"].keys()
    for key, tensor in saved["state_dict"].items():
        assert torch.equal(tensor, before["state_dict"][key]), key
    moments, expected = saved["optimizer_states"][0]["state"], before["optimizer_states"][0]["state"]
    assert moments.keys() == expected.keys()
    for index, state in moments.items():
        for name, value in state.items():
            assert torch.equal(value, expected[index][name]), (index, name)
    monkeypatch.undo()
    lower = 1.0e-4  # the config's is 1e-3
    resumed = _fit(config, "--ckpt_path", str(stop), "--model.init_args.optim.lr", str(lower))
    assert resumed.trainer.global_step == 5
    group = resumed.trainer.optimizers[0].param_groups[0]
    assert group["initial_lr"] == pytest.approx(lower) and group["lr"] <= lower
    assert resumed.trainer.lr_scheduler_configs[0].scheduler.base_lrs == [pytest.approx(lower)]


def test_a_resume_uses_the_configured_learning_rate():
    from lit_sftrl.run.checkpoint_io import use_configured_optimizer_settings

    checkpoint = {
        "optimizer_states": [{"param_groups": [{"lr": 5e-4, "initial_lr": 1e-3, "weight_decay": 0.0,
                                                "betas": (0.9, 0.999)}]}],
        "lr_schedulers": [{"base_lrs": [1e-3], "_last_lr": [5e-4]}],
    }
    use_configured_optimizer_settings(checkpoint, [{"lr": 1e-4, "weight_decay": 0.1, "betas": (0.8, 0.9)}])
    group = checkpoint["optimizer_states"][0]["param_groups"][0]
    assert group["lr"] == pytest.approx(5e-5) and group["initial_lr"] == 1e-4  # the schedule keeps its place
    assert group["weight_decay"] == 0.1 and group["betas"] == (0.8, 0.9)
    assert checkpoint["lr_schedulers"][0]["base_lrs"] == [pytest.approx(1e-4)]
    assert checkpoint["lr_schedulers"][0]["_last_lr"] == [pytest.approx(5e-5)]


def test_the_last_finite_state_is_copied_where_it_is_cheap():
    """LoRA-like (few trainable parameters): the copy stays beside them; full fine-tuning: it goes to host memory
    (the same device here, on CPU). Either way restore gives back the parameters and the optimizer moments."""
    from lit_sftrl.run.finite import LastFiniteState

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 400))
    model[1].requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for on_host, params in ((False, model[0].parameters()), (True, model.parameters())):
        snapshot = LastFiniteState()
        snapshot.capture(torch.optim.AdamW(list(params)), model)
        assert snapshot._on_host is on_host
    snapshot = LastFiniteState()
    snapshot.capture(optimizer, model)  # before the first step: no optimizer state yet
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    weights = [p.detach().clone() for p in model[0].parameters()]
    moments = {k: v.clone() for k, v in optimizer.state[model[0].weight].items()}
    snapshot.capture(optimizer, model)
    optimizer.step()
    with torch.no_grad():
        model[0].weight.fill_(float("nan"))
    snapshot.restore(optimizer)
    assert all(torch.equal(a, b) for a, b in zip(model[0].parameters(), weights))
    assert all(torch.equal(optimizer.state[model[0].weight][k], v) for k, v in moments.items())
    snapshot.capture(object(), model)  # not a torch optimizer (DeepSpeed's ZeRO): nothing captured
    assert not snapshot.captured
    first = LastFiniteState()
    fresh = torch.optim.AdamW(list(model[0].parameters()))
    first.capture(fresh, model)
    model(torch.ones(1, 4)).sum().backward()
    fresh.step()
    first.restore(fresh)
    assert not fresh.state  # back to before the first step: no moments


def test_ctrl_c_saves_a_checkpoint_that_resumes(tmp_path, model_dir, monkeypatch):
    """KeyboardInterrupt in the 4th step: last.ckpt holds step 3 and --ckpt_path last continues from there
    (before, nothing was saved and the resume restarted silently at step 0)."""
    from lit_sftrl.training.sft import SFTModule

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
        "import sys, time; from lit_sftrl.run.run_dir import RunDirectoryLock; "
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
    from lit_sftrl.run.run_dir import RunDirectoryLock

    with RunDirectoryLock(run_dir):  # a killed holder leaves no stale lock
        pass


def test_a_running_fit_holds_its_run_directory(tmp_path, model_dir, monkeypatch):
    """What the test above stands in for: while a fit trains, a second writer's lock on its run directory is
    refused, naming the fit's process."""
    import os

    from lit_sftrl.run.run_dir import RunDirectoryBusy, RunDirectoryLock
    from lit_sftrl.training.sft import SFTModule

    run_dir, config = _config(tmp_path, model_dir, max_steps=1, every=1)
    original, seen = SFTModule.training_step, []

    def probing(self, batch, batch_idx):
        try:
            RunDirectoryLock(run_dir).acquire("a second fit")
            seen.append("acquired")
        except RunDirectoryBusy as error:
            seen.append(str(error))
        return original(self, batch, batch_idx)

    monkeypatch.setattr(SFTModule, "training_step", probing)
    _fit(config)
    assert len(seen) == 1 and f"in use by process {os.getpid()}" in seen[0], seen


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


def test_a_full_disk_during_a_fit_ends_it_in_one_line_saying_no_space(tmp_path, model_dir, monkeypatch):
    """From the shell (sys.argv), a checkpoint write that hits ENOSPC ends the fit with one line, not a
    traceback through Lightning's callbacks."""
    import errno

    from lit_sftrl.cli import run
    from lit_sftrl.run import checkpoint_io

    _, config = _config(tmp_path, model_dir, max_steps=2, every=1)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_io.os, "fsync", full)
    monkeypatch.setattr(sys, "argv", ["lit-sftrl", "fit", "--config", str(config)])
    with pytest.raises(SystemExit) as exit_info:
        run()
    message = str(exit_info.value.code)
    assert message.startswith("lit-sftrl fit: no space left on device writing checkpoint") and "\n" not in message
