"""``bench/peers.py``: the systems take turns over the repeats, and every summary and ratio is what the runs gave.

The systems are stubs here (no TRL, no training): each returns the raw record a child process would.
"""

from __future__ import annotations

import argparse
import json

import pytest

from bench import peers as bench

TOKENS = 100.0  # per step, every system
# Steady seconds per step of each system in each of its 3 runs (every run also has a slow warm-up step first).
# Chosen so that a ratio of medians pooled over repeats differs from the median of per-repeat ratios.
STEADY = {"trl-grpo": [2.0, 4.0, 1.0], "lit-sftrl-grpo": [4.0, 1.0, 2.0], "lit-sftrl-ppo": [2.0, 4.0, 1.0]}
PEAK = {"trl-grpo": [1000.0, 1100.0, 900.0], "lit-sftrl-grpo": [1200.0, 1000.0, 1100.0],
        "lit-sftrl-ppo": [1300.0, 1300.0, 1300.0]}
LOADED = {"trl-grpo": 600.0, "lit-sftrl-grpo": 500.0, "lit-sftrl-ppo": 500.0}
WARM_UP = 100.0
ROLLOUT_RSS = 150.0  # what each run's first rollout adds to the RSS after load


@pytest.fixture
def stub_systems(monkeypatch):
    """bench.peers with every child replaced by a stub; returns the (system, model) calls in order."""
    calls: list[tuple[str, str]] = []

    def run_child(system, model, args):
        run = sum(1 for done, _ in calls if done == system)
        calls.append((system, str(model)))
        seconds = STEADY[system][run]
        record = {"system": system, "seconds": [WARM_UP, seconds, seconds], "tokens": [TOKENS] * 3,
                  "peak_rss_mb": PEAK[system][run], "loaded_rss_mb": LOADED[system],
                  "peak_after_rollout_mb": LOADED[system] + ROLLOUT_RSS}
        if system != "trl-grpo":  # lit-sftrl's split from metrics.csv: rollout 3/4 of the step, scoring 1/8
            record["split"] = {"rollout_s": [WARM_UP, 0.75 * seconds, 0.75 * seconds],
                               "scoring_s": [0.0, seconds / 8, seconds / 8],
                               "update_s": [0.0, seconds / 4, seconds / 4]}
        return record

    monkeypatch.setattr(bench, "run_child", run_child)
    return calls


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # what --models checks a directory for
    return tmp_path


def json_lines(out: str) -> dict[str, dict]:
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {line["system"]: line for line in lines}


def test_the_systems_take_turns_in_rotated_order_over_the_repeats(stub_systems, model_dir, capsys):
    bench.main(["--models", str(model_dir), "--repeats", "3"])
    assert [system for system, _ in stub_systems] == [
        "trl-grpo", "lit-sftrl-grpo", "lit-sftrl-ppo",
        "lit-sftrl-grpo", "lit-sftrl-ppo", "trl-grpo",
        "lit-sftrl-ppo", "trl-grpo", "lit-sftrl-grpo",
    ]
    assert {model for _, model in stub_systems} == {str(model_dir)}


def test_summaries_and_ratios_are_taken_over_steady_steps_and_within_each_repeat(stub_systems, model_dir, capsys):
    bench.main(["--models", str(model_dir), "--repeats", "3", "--json"])
    results = json_lines(capsys.readouterr().out)
    assert set(results) == set(bench.SYSTEMS)
    for system, line in results.items():
        assert {"system", "model", "seconds_per_step", "tokens_per_s", "peak_rss_mb"} <= set(line)
        assert line["model"] == str(model_dir) and line["repeats"] == 3 and line["steady_steps"] == 6
        # the warm-up steps (100 s) are left out of every figure
        assert line["seconds_per_step"] == pytest.approx(sorted(STEADY[system])[1])
        assert line["seconds_per_step_min"] == min(STEADY[system])
        assert line["seconds_per_step_max"] == max(STEADY[system])
        assert line["tokens_per_s"] == pytest.approx(TOKENS / sorted(STEADY[system])[1])
        assert line["tokens_per_s_max"] == pytest.approx(TOKENS / min(STEADY[system]))
        assert (line["peak_rss_mb"], line["peak_rss_mb_min"], line["peak_rss_mb_max"]) == (
            sorted(PEAK[system])[1], min(PEAK[system]), max(PEAK[system]))
        assert line["loaded_rss_mb"] == LOADED[system]
        assert line["work_rss_mb"] == pytest.approx(sorted(PEAK[system])[1] - LOADED[system])
        assert line["rollout_rss_mb"] == ROLLOUT_RSS
        assert line["update_rss_mb"] == pytest.approx(sorted(PEAK[system])[1] - LOADED[system] - ROLLOUT_RSS)

    grpo, ppo = results["lit-sftrl-grpo"], results["lit-sftrl-ppo"]
    # Throughput, repeat by repeat: GRPO 25, 100, 50 tokens/s against TRL's 50, 25, 100: 0.5, 4, 0.5 (pooled over
    # repeats, both medians are 50: 1.0, which is not what a fair comparison on a shared machine asks for).
    assert grpo["throughput_vs_trl"]["per_repeat"] == pytest.approx([0.5, 4.0, 0.5])
    assert (grpo["throughput_vs_trl"]["median"], grpo["throughput_vs_trl"]["min"],
            grpo["throughput_vs_trl"]["max"]) == pytest.approx((0.5, 0.5, 4.0))
    assert grpo["peak_rss_vs_trl"]["per_repeat"] == pytest.approx([1.2, 1000 / 1100, 1100 / 900])
    assert grpo["peak_rss_vs_trl"]["median"] == pytest.approx(1.2)
    assert ppo["step_time_vs_grpo"]["per_repeat"] == pytest.approx([0.5, 4.0, 0.5])
    assert ppo["step_time_vs_grpo"]["median"] == pytest.approx(0.5)
    assert "throughput_vs_trl" not in ppo and "step_time_vs_grpo" not in results["trl-grpo"]
    # lit-sftrl's step split, medians of the steady steps
    assert grpo["split_s"] == pytest.approx({"rollout_s": 0.75 * 2.0, "scoring_s": 2.0 / 8, "update_s": 2.0 / 4})
    assert "split_s" not in results["trl-grpo"]


def test_the_report_shows_the_split_the_memory_after_load_and_the_ratios(stub_systems, model_dir, capsys):
    bench.main(["--models", str(model_dir), "--repeats", "3"])
    out = capsys.readouterr().out
    split = "step split (median s): rollout 1.50, update 0.50 = scoring forwards 0.25 + backward and optimizer 0.25"
    assert split in out
    assert "lit-sftrl-grpo / trl-grpo tokens_per_s: 0.50x (min 0.50, max 4.00 over 3 repeats; goal >= 2)" in out
    assert "lit-sftrl-ppo / lit-sftrl-grpo seconds_per_step: 0.50x" in out
    assert "after load" in out and "work = peak RSS - RSS right after imports and model load = rollout" in out
    # TRL's row: median peak 1000, after load 600: work 400 = rollout 150 + update 250
    assert any(line.split()[-4:] == ["600", "400", "150", "250"] for line in out.splitlines() if "trl-grpo" in line)


def test_a_system_left_out_drops_only_its_ratios(stub_systems, model_dir, capsys):
    bench.main(["--models", str(model_dir), "--repeats", "2", "--systems", "lit-sftrl-grpo", "lit-sftrl-ppo",
                "--json"])
    assert [system for system, _ in stub_systems] == ["lit-sftrl-grpo", "lit-sftrl-ppo", "lit-sftrl-ppo",
                                                      "lit-sftrl-grpo"]
    results = json_lines(capsys.readouterr().out)
    assert "throughput_vs_trl" not in results["lit-sftrl-grpo"]
    assert results["lit-sftrl-ppo"]["step_time_vs_grpo"]["per_repeat"] == pytest.approx([0.5, 4.0])


def test_lit_sftrl_steps_read_the_time_columns_of_metrics_csv(tmp_path):
    metrics = tmp_path / "metrics.csv"
    metrics.write_text(
        "epoch,step,time/rollout_s,time/scoring_s,time/update_s,train/rollout_tokens,val/id/success\n"
        ",,,,,,0.5\n"  # an evaluation row: no update in it
        "0,1,3.0,0.5,1.0,400,\n"
        "1,2,2.0,0.25,0.5,380,\n"
    )
    assert bench.lit_sftrl_steps(metrics) == {
        "seconds": [4.0, 2.5], "tokens": [400.0, 380.0],
        "split": {"rollout_s": [3.0, 2.0], "scoring_s": [0.5, 0.25], "update_s": [1.0, 0.5]},
    }


def test_models_that_are_not_a_model_are_refused_in_one_line(stub_systems, tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--models", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert f"--models {tmp_path / 'nope'}: not 'tiny', a GGUF file or a model directory" in err
    assert stub_systems == []


def test_a_model_directory_or_gguf_file_is_taken_and_passed_on_absolute(stub_systems, model_dir, tmp_path,
                                                                         monkeypatch, capsys):
    monkeypatch.chdir(model_dir.parent)
    bench.main(["--models", model_dir.name, "--repeats", "1", "--systems", "lit-sftrl-ppo"])
    assert stub_systems == [("lit-sftrl-ppo", str(model_dir))]  # the children run from the repository's root
    with pytest.raises(SystemExit):
        bench.main(["--models", str(tmp_path / "SmolLM2.gguf")])  # no such file
    assert "SmolLM2.gguf: not 'tiny', a GGUF file or a model directory" in capsys.readouterr().err


@pytest.mark.parametrize("checkpointing", [True, False])
def test_the_activation_checkpointing_setting_reaches_lit_sftrls_run(monkeypatch, model_dir, checkpointing):
    # TRL's GRPOConfig checkpoints activations by default and lit-sftrl's backbone does not: left to each
    # default, the update's memory was compared unlike with unlike. The setting goes parent -> child -> fit.
    class Launched(Exception):
        pass

    commands, fits = [], []

    def child(command, **_):
        commands.append(command)
        return argparse.Namespace(returncode=0, stdout='{"system": "lit-sftrl-grpo"}\n', stderr="")

    def fit(argv):
        fits.append(argv)
        raise Launched

    monkeypatch.setattr(bench.subprocess, "run", child)
    monkeypatch.setattr("lit_sftrl.cli.run", fit)
    args = argparse.Namespace(steps=2, completions=4, group=2, max_tokens=8, temperature=0.6, lr=1e-5,
                              gradient_checkpointing=checkpointing)
    bench.run_child("lit-sftrl-grpo", model_dir, args)
    [command] = commands
    with pytest.raises(Launched):
        bench.main(command[command.index("--one"):])
    [argv] = fits
    setting = argv[argv.index("--model.init_args.backbone.gradient_checkpointing") + 1]
    assert setting == str(checkpointing).lower()
