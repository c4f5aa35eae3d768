"""Progress a user can follow: each rollout, PPO update and evaluation reports counts and an ETA, as plain lines
when the console is not a terminal; the model summary and the console hold nothing a user cannot act on."""

from __future__ import annotations

import csv
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench import kill_resume
from lit_sftrl.run import progress
from lit_sftrl.run.progress import Phase, RunProgressBar

REPO = Path(__file__).resolve().parents[1]

# Every line a fit may print: the model summary, progress, evaluation summaries and Lightning's stop reason. A
# third-party line of any wording (a new release's warning, a logger nobody filtered) matches none of them.
OWN_LINE = re.compile("|".join([
    r"Name\s+Type\s+Params\s*$",  # the model summary: its header, one row per module, the totals
    r"\w+\s+\w+\s+[\d.]+\s?[KMBT]?\s*$",
    r"[\d.]+\s?[KMBT]? trainable parameters of [\d.]+\s?[KMBT]?, [\d.]+ MB$",
    r"(rollout|update|evaluation|train) \d+/\d+ \w+",  # progress lines (lit_sftrl.run.progress)
    r"\[(sanity|val|test) @ step \d+\] ",  # evaluation summaries (lit_sftrl.training.evaluation)
    r"`Trainer\.fit` stopped: ",  # why the fit ended
]))


def test_plain_lines_every_tenth_with_an_eta(monkeypatch):
    clock = iter(float(t) for t in range(0, 1000, 6))  # 6 s between calls: every tenth is due
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    lines: list[str] = []
    with Phase("rollout", 64, "attempts", write=lines.append) as phase:
        for _ in range(8):
            phase.advance(8)
    assert lines[0] == "rollout 8/64 attempts, 6.0 s, ETA 42.0 s"
    assert lines[-1].startswith("rollout 64/64 attempts, 48.0 s") and "ETA" not in lines[-1]
    assert len(lines) == 8


def test_quick_phases_write_one_line_and_silent_ones_none(monkeypatch):
    monkeypatch.setattr(progress.time, "monotonic", lambda: 0.0)
    lines: list[str] = []
    with Phase("update", 128, "attempts", write=lines.append) as phase:
        for _ in range(16):
            phase.advance(8)
    assert lines == ["update 128/128 attempts, 0.0 s"]
    with Phase("update", 128, "attempts") as silent:  # no bar (enable_progress_bar false, other ranks)
        silent.advance(128)


def test_the_epoch_bar_names_updates_and_never_reads_minus_two():
    bar = RunProgressBar()

    def description(max_epochs: int, automatic: bool) -> str:
        module = SimpleNamespace(automatic_optimization=automatic)
        bar._trainer = SimpleNamespace(max_epochs=max_epochs, lightning_module=module)
        return bar._get_train_description(0).strip()

    assert description(10, automatic=False) == "Update 1/10"
    assert description(-1, automatic=True) == "Epoch 0"  # an SFT run bounded by max_steps read "Epoch 0/-2"
    assert description(3, automatic=True) == "Epoch 0/2"


@pytest.mark.slow
def test_a_ppo_fit_off_a_terminal_prints_progress_and_no_noise(tmp_path, tiny_dir_factory):
    run = tmp_path / "run"
    args = [kill_resume.lit_sftrl_bin(), "fit", "--config", str(REPO / "configs/gp_l_ppo.yaml"),
            "--trainer.default_root_dir", str(run), "--trainer.accelerator", "cpu",
            "--model.init_args.backbone.path", str(tiny_dir_factory("mllama")),
            "--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1",
            "--data.init_args.num_envs", "2", "--data.init_args.rollout_steps", "4",
            "--data.init_args.evaluation.val_episodes", "2", "--data.init_args.evaluation.chunk", "2",
            "--model.init_args.ppo.ppo_epochs", "1", "--model.init_args.ppo.minibatch_size", "4",
            "--model.init_args.ppo.micro_batch_size", "2", "--model.init_args.sampling.max_new_tokens", "8",
            "--model.init_args.eval_sampling.max_new_tokens", "8"]
    result = subprocess.run(args, env={**kill_resume.child_env(), "PYTHONWARNINGS": "default"}, cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    console = result.stdout + result.stderr
    for line in ("rollout 4/4 attempts", "update 4/4 attempts", "evaluation 4/4 episodes", "train 1/1 updates"):
        assert line in result.stderr, console[-3000:]
    assert "trainable parameters" in console
    for noise in ("Total FLOPs", "FLOPs", "kernels-community", "Epoch 0/-2", "Modules in", "Traceback"):
        assert noise not in console, console[-3000:]
    strangers = [line for line in console.splitlines() if line.strip() and not OWN_LINE.match(line)]
    assert not strangers, f"lines the project did not write: {strangers}"
    with open(run / "metrics.csv", newline="") as file:
        row = next(r for r in csv.DictReader(file) if r.get("time/update_s"))
    for key in ("time/rollout_s", "time/update_s", "time/attempts_per_s", "time/rollout_tokens_per_s",
                "time/update_tokens_per_s"):
        assert float(row[key]) > 0, key
