"""Reliability drills: SIGKILL and resume, damaged checkpoints, NaN/inf losses.

* A fit killed with SIGKILL resumes from its last checkpoint (``--ckpt_path last``) and ends at ``max_steps``
  with the data stream at the right position; the steps it replays match the killed run's exactly; every
  checkpoint on disk after the kill reads back whole. Lightning stages each checkpoint in a temporary file and
  renames it into place (``_atomic_save``: an fsspec transaction); a test pins that down. Many random kills,
  and a comparison with an uninterrupted run, are ``bench/kill_resume.py``.
* A truncated or corrupted checkpoint given to ``--ckpt_path`` (a file or ``last``), ``--model.init_from`` or
  ``lit-sftrl export`` fails at once with one message naming the file, no traceback; so does a damaged model
  directory given to ``--model.init_from`` or ``--model.backbone.path``.
* A non-finite loss skips its step with a warning and the run goes on; ``max_nonfinite_losses`` of them in a
  row stop it with a clear message after saving ``nonfinite-stop.ckpt``, which loads and resumes.

Children run with one OpenMP thread: on a loaded 2-core machine two threads make a step ten times slower.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from bench import kill_resume
from lit_sftrl.models.export import check_lightning_checkpoint, read_lightning_checkpoint

MAX_STEPS, EVERY = 6, 2


@pytest.fixture(scope="module")
def model_dir(tiny_dir_factory) -> Path:
    return tiny_dir_factory("mllama")


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(
    tmp_path: Path, model: Path, name: str = "run", max_steps: int = MAX_STEPS, every: int = EVERY
) -> tuple[Path, Path]:
    run = tmp_path / name
    return run, kill_resume.write_config(run, model, max_steps, every)


def _fit(config: Path, *extra: str):
    from lit_sftrl.cli import run

    return run(["fit", "--config", str(config), *extra])


# ----------------------------------------------------------------------------------------------- 1. SIGKILL


def test_a_write_that_dies_midway_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    """What a SIGKILL during a save amounts to for the target file: the staged write never reaches it."""
    from fsspec.implementations.local import LocalFileOpener
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    path = tmp_path / "last.ckpt"
    io = TorchCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.zeros(1000)}, "global_step": 1}, path)
    before = path.read_bytes()

    def die(self, data):  # write half, then the process "dies"
        self.f.write(data[: len(data) // 2])
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(LocalFileOpener, "write", die, raising=False)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.ones(1000)}, "global_step": 2}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert torch.load(path, weights_only=True)["global_step"] == 1


@pytest.mark.slow
def test_sigkill_then_resume_from_last(tmp_path, model_dir):
    """Kill -9 once a checkpoint exists and a step beyond it ran; resume; compare."""
    run, config = _config(tmp_path, model_dir)
    staging = tmp_path / "staging"
    staging.mkdir()
    env = kill_resume.child_env(staging)
    log = tmp_path / "fit.log"

    process = kill_resume.start_fit(config, False, env, log)
    beyond_a_checkpoint = lambda: (  # noqa: E731
        (steps := kill_resume.checkpoint_steps(run))
        and max(int(r["step"]) for r in kill_resume.metric_rows(run)) >= max(steps)
    )
    assert kill_resume.kill_when(process, beyond_a_checkpoint, timeout=240), (
        f"the run ended before the kill:\n{log.read_text()[-3000:]}"
    )
    assert process.returncode == -9
    killed_rows = {int(r["step"]): r for r in kill_resume.metric_rows(run)}
    assert kill_resume.unreadable_checkpoints(run) == []
    resumed_from = read_lightning_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"]
    assert 0 < resumed_from < MAX_STEPS

    result = subprocess.run([kill_resume.lit_sftrl_bin(), "fit", "--config", str(config), "--ckpt_path", "last"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    last = read_lightning_checkpoint(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == MAX_STEPS  # what an uninterrupted run ends with
    assert last["SFTDataModule"] == {"batches_consumed": MAX_STEPS}  # the stream's position: one batch per step
    assert (run / "checkpoints" / f"epoch=0-step={MAX_STEPS}.ckpt").exists()
    assert kill_resume.unreadable_checkpoints(run) == []

    # The resumed run replays the steps after its checkpoint: same batches (cumulative tokens) and, the weights,
    # optimizer and schedule restored exactly, the same losses as the killed run had for them. (Its CSVLogger
    # replaced metrics.csv: Lightning deletes an existing one; the killed run's rows were read before.)
    resumed_rows = {int(r["step"]): r for r in kill_resume.metric_rows(run)}
    assert sorted(resumed_rows) == list(range(resumed_from, MAX_STEPS))
    replayed = sorted(set(killed_rows) & set(resumed_rows))
    assert replayed, "the kill left no step to replay"
    for step in replayed:
        assert resumed_rows[step]["train/tokens"] == killed_rows[step]["train/tokens"], step
        assert float(resumed_rows[step]["train/loss"]) == pytest.approx(
            float(killed_rows[step]["train/loss"]), rel=1e-5
        ), step
    assert float(resumed_rows[MAX_STEPS - 1]["train/tokens"]) == last["tokens_seen"]


# ----------------------------------------------------------------------------------------------- 2. damaged files


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory, model_dir) -> Path:
    """A real checkpoint of a 2-step SFT run (in-process)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run, config = _config(tmp_path_factory.mktemp("real"), model_dir, max_steps=2, every=2)
        _fit(config)
    finally:
        torch.set_num_threads(threads)
    return run / "checkpoints" / "last.ckpt"


def _damage(source: Path, folder: Path, kind: str) -> Path:
    data = source.read_bytes()
    path = folder / f"{kind}.ckpt"
    if kind == "truncated":
        data = data[: len(data) * 2 // 3]
    elif kind == "last_byte_missing":
        data = data[:-1]
    elif kind == "empty":
        data = b""
    elif kind == "garbage":
        data = os.urandom(50_000)
    elif kind == "flipped_tensor_bytes":  # a whole zip whose tensor data no longer matches its CRC
        middle = len(data) // 2
        data = data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 64]) + data[middle + 64 :]
    elif kind == "foreign":
        torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1.0}}, path)
        return path
    path.write_bytes(data)
    return path


DAMAGE = ["truncated", "last_byte_missing", "empty", "garbage", "flipped_tensor_bytes", "foreign"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_every_kind_of_damage_is_detected(kind, real_checkpoint, tmp_path):
    """The check behind every entry point: a ValueError that names the file and says what is wrong, in one line."""
    bad = _damage(real_checkpoint, tmp_path, kind)
    with pytest.raises(ValueError) as error:
        check_lightning_checkpoint(bad)
    message = str(error.value)
    assert str(bad) in message and "\n" not in message and len(message) < 300, message
    assert ("not written by lit-sftrl" if kind == "foreign" else "corrupted") in message


@pytest.mark.parametrize("kind", ["truncated", "flipped_tensor_bytes"])
def test_damaged_checkpoint_is_refused_in_process(kind, real_checkpoint, tmp_path, model_dir):
    """All three entry points: SystemExit (not a traceback) whose message names the file; nothing is built."""
    from lit_sftrl.cli import run

    bad = _damage(real_checkpoint, tmp_path, kind)
    _, config = _config(tmp_path, model_dir)
    for argv in (["fit", "--config", str(config), "--ckpt_path", str(bad)],
                 ["fit", "--config", str(config), "--model.init_args.init_from", str(bad)],
                 ["export", "--ckpt", str(bad), "--out", str(tmp_path / "exported")]):
        with pytest.raises(SystemExit) as exit_info:
            run(argv)
        message = str(exit_info.value.code)
        assert str(bad) in message, (argv, message)
        assert len(message.splitlines()) <= 3 and len(message) < 400, message
    assert not (tmp_path / "exported").exists() or not any((tmp_path / "exported").iterdir())


def test_damaged_last_checkpoint_is_refused(real_checkpoint, tmp_path, model_dir):
    """--ckpt_path last names no file on the command line: the one Lightning would pick is checked."""
    from lit_sftrl.cli import run

    run_dir, config = _config(tmp_path, model_dir)
    (run_dir / "checkpoints").mkdir(parents=True)
    _damage(real_checkpoint, run_dir / "checkpoints", "truncated").rename(run_dir / "checkpoints" / "last.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", str(config), "--ckpt_path", "last"])
    message = str(exit_info.value.code)
    assert "last.ckpt" in message and "truncated or corrupted" in message and "--ckpt_path" in message


@pytest.mark.slow
def test_damaged_checkpoint_from_the_shell_gives_one_line_and_no_traceback(real_checkpoint, tmp_path, model_dir):
    """As a user meets them: a process each for the LightningCLI path (``--ckpt_path`` used to end in torch's
    traceback) and the tool path (export); exit status and stderr. ``--model.init_from`` fails on the same
    LightningCLI path, checked in-process above."""
    _, config = _config(tmp_path, model_dir)
    truncated = _damage(real_checkpoint, tmp_path, "truncated")
    corrupted = _damage(real_checkpoint, tmp_path, "flipped_tensor_bytes")
    commands = {
        truncated: ["fit", "--config", str(config), "--ckpt_path", str(truncated)],
        corrupted: ["export", "--ckpt", str(corrupted), "--out", str(tmp_path / "exported")],
    }
    env = kill_resume.child_env()
    processes = {bad: subprocess.Popen([kill_resume.lit_sftrl_bin(), *argv], env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True) for bad, argv in commands.items()}
    for bad, process in processes.items():
        _, stderr = process.communicate(timeout=180)
        assert process.returncode != 0, stderr
        assert "Traceback" not in stderr, stderr
        assert str(bad) in stderr, stderr
        assert "corrupted" in stderr and len(stderr.strip().splitlines()[-1]) < 300, stderr


def test_whole_checkpoint_passes_the_check(real_checkpoint, tmp_path):
    check_lightning_checkpoint(real_checkpoint)  # no exception
    copy = tmp_path / "copy.ckpt"
    shutil.copy(real_checkpoint, copy)
    assert read_lightning_checkpoint(copy, mmap=True)["global_step"] == 2


def _damaged_model_dir(source: Path, folder: Path, kind: str) -> tuple[Path, str]:
    """A copy of a model directory with one kind of damage, and the file the refusal must name."""
    path = folder / f"model-{kind}"
    shutil.copytree(source, path)
    weights = path / "model.safetensors"
    if kind == "truncated_weights":  # a copy or an export cut short
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return path, str(weights)
    if kind == "garbage_weights":
        weights.write_bytes(os.urandom(4096))
        return path, str(weights)
    if kind == "garbage_config":
        (path / "config.json").write_text('{"model_type": "mll')
        return path, str(path / "config.json")
    (path / "config.json").unlink()  # "no_config": not a model directory at all
    return path, str(path)


MODEL_DAMAGE = ["truncated_weights", "garbage_weights", "garbage_config", "no_config"]


@pytest.mark.parametrize("kind", MODEL_DAMAGE)
def test_damaged_model_directory_is_refused_before_anything_runs(kind, tmp_path, model_dir):
    """An exported or downloaded directory given as ``--model.init_from`` or ``--model.backbone.path``: one
    message naming the file, not a traceback from inside transformers; the Backbone refuses it too."""
    from lit_sftrl.cli import run
    from lit_sftrl.models import Backbone, BackboneConfig
    from lit_sftrl.models.loading import check_model_directory

    bad, named = _damaged_model_dir(model_dir, tmp_path, kind)
    with pytest.raises(ValueError, match="truncated or corrupted|not a Hugging Face model directory") as error:
        check_model_directory(bad)
    assert named in str(error.value) and "\n" not in str(error.value)
    with pytest.raises((ValueError, FileNotFoundError), match="truncated or corrupted|not a Hugging Face model dir"):
        Backbone(BackboneConfig(path=str(bad)))
    _, config = _config(tmp_path, model_dir)
    for key in ("init_from", "backbone.path"):
        with pytest.raises(SystemExit) as exit_info:
            run(["fit", "--config", str(config), f"--model.init_args.{key}", str(bad)])
        message = str(exit_info.value.code)
        assert named in message and f"model.{key}" in message and len(message.splitlines()) <= 3, message
    check_model_directory(model_dir)  # the undamaged original passes


# ----------------------------------------------------------------------------------------------- 4. NaN / inf


def _nan_on(monkeypatch, calls: set[int], value: float = float("nan")) -> list[int]:
    """The SFT objective returns ``value`` x itself on the given calls (0-based); returns the call counter."""
    from lit_sftrl.training import sft

    original, counter = sft.sft_loss, [0]

    def sft_loss(logits, labels):
        loss = original(logits, labels)
        index = counter[0]
        counter[0] += 1
        return loss * value if index in calls else loss

    monkeypatch.setattr(sft, "sft_loss", sft_loss)
    return counter


def _watch_weights(monkeypatch) -> dict[int, bool]:
    """batch index -> whether the step changed any trainable weight."""
    from lit_sftrl.training.sft import SFTModule

    before, changed = {}, {}

    def start(self, batch, batch_idx):
        before[batch_idx] = {k: v.detach().clone() for k, v in self.backbone.trainable_state_dict().items()}

    def end(self, outputs, batch, batch_idx):
        after = self.backbone.trainable_state_dict()
        changed[batch_idx] = any(not torch.equal(after[k], v) for k, v in before[batch_idx].items())

    monkeypatch.setattr(SFTModule, "on_train_batch_start", start, raising=False)
    monkeypatch.setattr(SFTModule, "on_train_batch_end", end, raising=False)
    return changed


def test_one_nonfinite_loss_skips_its_step_and_training_goes_on(tmp_path, model_dir, monkeypatch, one_thread):
    max_steps = 5
    run_dir, config = _config(tmp_path, model_dir, max_steps=max_steps, every=max_steps)
    _nan_on(monkeypatch, {2}, float("inf"))
    changed = _watch_weights(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = _fit(config)
    messages = [str(w.message) for w in caught]
    assert any("non-finite loss at step 2: step skipped (1 in a row)" in m for m in messages), messages

    trainer, module = cli.trainer, cli.model
    assert changed == {0: True, 1: True, 2: False, 3: True, 4: True}  # the inf step left the weights alone
    # Lightning's real behaviour when training_step returns None under automatic optimisation: the optimizer's
    # step() still runs (with no gradients AdamW updates nothing and counts nothing), the batch counts as a
    # global step, the schedule advances. So the run ends at max_steps batches, with one update fewer.
    assert trainer.global_step == max_steps
    adam_steps = {int(state["step"]) for state in trainer.optimizers[0].state.values()}
    assert adam_steps == {max_steps - 1}
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == max_steps
    assert module._nonfinite_in_a_row == 0  # reset by the next finite loss
    last = read_lightning_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert last["global_step"] == max_steps and last["SFTDataModule"] == {"batches_consumed": max_steps}
    assert not (run_dir / "checkpoints" / "nonfinite-stop.ckpt").exists()


def test_repeated_nonfinite_losses_stop_the_run_saved(tmp_path, model_dir, monkeypatch, one_thread):
    """From the shell: one line naming the saved checkpoint. In-process: the FloatingPointError itself. The saved
    state holds the last good weights and resumes."""
    run_dir, config = _config(tmp_path, model_dir, max_steps=20, every=20)
    counter = _nan_on(monkeypatch, {1, 2, 3})
    changed = _watch_weights(monkeypatch)
    monkeypatch.setattr(
        sys, "argv", ["lit-sftrl", "fit", "--config", str(config), "--model.init_args.max_nonfinite_losses", "3"]
    )
    from lit_sftrl.cli import run

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(SystemExit) as exit_info:
            run(None)  # as the console script calls it
    stop = run_dir / "checkpoints" / "nonfinite-stop.ckpt"
    message = str(exit_info.value.code)
    assert message.startswith("lit-sftrl fit: 3 non-finite losses in a row at step 3: stopped.")
    assert str(stop) in message and "--ckpt_path" in message and "\n" not in message
    assert counter[0] == 4 and changed == {0: True, 1: False, 2: False}  # batch 3 raised before its end hook

    check_lightning_checkpoint(stop)
    saved = read_lightning_checkpoint(stop)
    assert saved["global_step"] == 3 and saved["SFTDataModule"] == {"batches_consumed": 3}
    assert all(torch.isfinite(t).all() for t in saved["state_dict"].values())

    # Resume from it (the losses are finite again) to a few more steps.
    monkeypatch.undo()
    cli = _fit(config, "--ckpt_path", str(stop), "--trainer.max_steps", "5")
    assert cli.trainer.global_step == 5


def test_repeated_nonfinite_losses_raise_in_process(tmp_path, model_dir, monkeypatch, one_thread):
    _, config = _config(tmp_path, model_dir, max_steps=20, every=20)
    _nan_on(monkeypatch, set(range(100)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(
            FloatingPointError, match=r"2 non-finite losses in a row at step 1: stopped\. State saved to"
        ):
            _fit(config, "--model.init_args.max_nonfinite_losses", "2")
