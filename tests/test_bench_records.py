"""The learning-curve and study benches read back what the README quotes, and never evaluate on the test seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import learning_curves, ppo_learning, study


def _record(run: Path, stage: str, step: int, epoch: int, per_step: float) -> None:
    metrics = {"id": {"per_step_accuracy": per_step, "per_step_accuracy_stderr": 0.01},
               "rule_ood": {"per_step_accuracy": 0.0, "per_step_accuracy_stderr": 0.0}}
    (run / "eval").mkdir(parents=True, exist_ok=True)
    (run / "eval" / f"{stage}-step{step:07d}.json").write_text(
        json.dumps({"stage": stage, "step": step, "epoch": epoch, "metrics": metrics})
    )


def test_validation_passes_are_read_in_order_with_the_update_they_followed(tmp_path):
    # Written out of order on purpose: the pre-training pass (sanity) is update 0, epoch e ends update e + 1.
    _record(tmp_path, "validate", 80, 9, 0.30)
    _record(tmp_path, "sanity", 0, 0, 0.20)
    _record(tmp_path, "validate", 40, 4, 0.25)
    rows = ppo_learning.read_validation(tmp_path, "virl_l")
    assert [row["update"] for row in rows] == [0, 5, 10]
    assert [row["id"] for row in rows] == [0.20, 0.25, 0.30]
    assert rows[1]["id_stderr"] == 0.01 and rows[1]["rule_ood"] == 0.0


def test_pooled_start_and_end_weigh_updates_by_their_counts():
    pooled = ppo_learning.pooled([{"value": 0.0, "n": 10.0}, {"value": 1.0, "n": 30.0}])
    assert pooled["value"] == pytest.approx(0.75) and pooled["n"] == 40.0
    assert pooled["stderr"] == pytest.approx((0.75 * 0.25 / 40) ** 0.5)


@pytest.mark.parametrize("main, flag", [(ppo_learning.main, "--eval-seed"), (study.main, "--val-seed")])
def test_the_benches_refuse_to_validate_on_the_test_episodes(main, flag, capsys):
    with pytest.raises(SystemExit):
        main(["--task", "gp_l", flag, "1234"])
    assert "test episodes" in capsys.readouterr().err


def fake_stages(monkeypatch, flops: dict[str, float], init_steps: int) -> list[list[str]]:
    """The study's stages recorded instead of run; checkpoints' FLOPs and steps as given."""
    import lit_sftrl.study as package_study

    commands: list[list[str]] = []
    monkeypatch.setattr(package_study, "run_lit_sftrl", lambda args, in_process: commands.append(args))
    monkeypatch.setattr(package_study, "inherited_flops", lambda path: flops[Path(path).parts[-3]])
    monkeypatch.setattr(package_study, "checkpoint_steps", lambda path: init_steps)
    return commands


def test_the_study_passes_rl_overrides_to_the_rl_runs_alone_and_matches_sft_to_its_flops(tmp_path, monkeypatch):
    # 1 GFLOP per Init step, so RL's extra 150 GFLOPs buy 150 SFT steps
    commands = fake_stages(monkeypatch, {"init": 300e9, "rl": 450e9}, init_steps=300)
    study.main(["--task", "virl_l", "--init-steps", "300", "--out", str(tmp_path / "out"),
                "--rl-args", "--model.init_args.ppo.kl_coef 0.05", "--docs", str(tmp_path / "docs")])
    rl_fit, sft_fit, rl_test = commands[1], commands[2], commands[5]
    assert "configs/virl_l_ppo.yaml" in rl_fit and "configs/virl_l_ppo.yaml" in rl_test
    for command in (rl_fit, rl_test):
        assert command[command.index("--model.init_args.ppo.kl_coef") + 1] == "0.05"
    assert not any("kl_coef" in arg for command in commands if command not in (rl_fit, rl_test) for arg in command)
    assert sft_fit[sft_fit.index("--trainer.max_steps") + 1] == "150"
    record = json.loads((tmp_path / "docs" / "study.json").read_text())
    assert record["rl_args"] == "--model.init_args.ppo.kl_coef 0.05" and record["sft_steps"] == 150


def test_the_study_bench_runs_seeds_and_keeps_each_seeds_records(tmp_path, monkeypatch):
    # Seed 0's RL spent 150 GFLOPs beyond Init, seed 1's 120: each SFT seed gets its own RL seed's steps.
    commands = fake_stages(monkeypatch, {"init": 300e9, "rl_seed0": 450e9, "rl_seed1": 420e9}, init_steps=300)
    out, docs = tmp_path / "out", tmp_path / "docs"
    for folder in ("init", "init_test", "rl_seed0", "rl_seed1", "sft_seed0", "sft_seed1"):
        _record(out / folder, "test", 1, 0, 0.5)
    study.main(["--task", "virl_l", "--init-steps", "300", "--seeds", "2", "--out", str(out), "--docs", str(docs)])
    assert [c[c.index("--seed_everything") + 1] for c in commands if "--seed_everything" in c] == ["0", "1", "0", "1"]
    summary = json.loads((docs / "study.json").read_text())
    assert summary["seeds"] == 2 and summary["sft_steps"] == [150, 120]
    assert all((docs / folder / "eval").is_dir() for folder in ("rl_seed0", "rl_seed1", "sft_seed0", "sft_seed1"))


def test_the_study_replaces_an_earlier_studys_records_instead_of_mixing_them(tmp_path):
    out, docs = tmp_path / "out", tmp_path / "docs"
    _record(out / "sft", "test", 172, 0, 0.7)
    (out / "report").mkdir(parents=True)
    (out / "report" / "report.md").write_text("new")
    _record(docs / "sft", "test", 170, 0, 0.5)  # an earlier study's SFT stopped at another step
    (docs / "report").mkdir()
    (docs / "report" / "stale.png").write_text("old")
    study.keep_records(out, docs, ["sft"])
    assert [p.name for p in (docs / "sft" / "eval").iterdir()] == ["test-step0000172.json"]
    assert sorted(p.name for p in (docs / "report").iterdir()) == ["report.md"]


def test_a_study_from_a_base_tests_it_first_and_probes_what_each_post_training_kept(tmp_path, monkeypatch):
    from lit_sftrl.study import Study

    commands = fake_stages(monkeypatch, {"init": 300e9, "rl": 450e9}, init_steps=300)
    probes = []

    def probe(self):
        probes.append(self.config.probe)
        (self.out / "probe").mkdir(parents=True)
        (self.out / "probe" / "probe.json").write_text("{}")

    monkeypatch.setattr(Study, "_probe", probe)
    out, docs, base = tmp_path / "out", tmp_path / "docs", tmp_path / "my-base"
    base.mkdir()
    study.main(["--task", "virl_l", "--base", str(base), "--out", str(out), "--docs", str(docs)])
    assert [probe.items for probe in probes] == [50]
    base_test = commands[0]
    assert base_test[0] == "test" and base_test[base_test.index("--model.init_args.backbone.path") + 1] == str(base)
    assert (docs / "probe" / "probe.json").exists()
    assert json.loads((docs / "study.json").read_text())["stages"][-1]["command"].startswith("probe_skills(")


def test_seeds_are_averaged_per_evaluation_and_the_gain_judged_against_their_spread():
    def curve(first: float, last: float) -> list[dict[str, float]]:
        return [{"update": 0, "id": first, "id_stderr": 0.05}, {"update": 20, "id": last, "id_stderr": 0.05}]

    rising = [curve(0.20, 0.30), curve(0.22, 0.30), curve(0.21, 0.32)]
    mean = ppo_learning.over_seeds(rising)
    assert [point["update"] for point in mean] == [0, 20]
    assert mean[1]["id"] == pytest.approx(0.30666, abs=1e-4)
    assert mean[1]["id_stderr"] == pytest.approx(0.011547 / 3 ** 0.5, abs=1e-5)  # sample s.d. 0.0115 over 3 seeds
    gain = ppo_learning.gain_over_seeds(rising)["id"]
    assert gain["per_seed"] == pytest.approx([0.10, 0.08, 0.11])
    assert gain["mean"] == pytest.approx(0.09666, abs=1e-4) and gain["beyond_two_stderr"]
    noisy = [curve(0.20, 0.30), curve(0.25, 0.20), curve(0.22, 0.24)]  # one seed up, one down: no claim
    assert not ppo_learning.gain_over_seeds(noisy)["id"]["beyond_two_stderr"]
    assert not ppo_learning.gain_over_seeds([curve(0.2, 0.9)])["id"]["beyond_two_stderr"]  # one seed: never


def test_seeds_must_be_positive():
    with pytest.raises(SystemExit):
        ppo_learning.main(["--task", "virl_l", "--seeds", "0"])


def fake_learning_runs(monkeypatch) -> list[tuple[str, ...]]:
    """``bench.ppo_learning``'s ``lit-sftrl`` runs replaced by records: 4 updates, validation 0.20 before training
    and 0.30 + 0.01 x seed after (seed 0 when the command sets none). Returns the commands it was given."""
    commands = []

    def fake_run_cli(*args: str) -> dict:
        commands.append(args)
        run = Path(args[args.index("--trainer.default_root_dir") + 1])
        seed = int(args[args.index("--seed_everything") + 1]) if "--seed_everything" in args else 0
        run.mkdir(parents=True)
        header = "train/update,train/success,train/episodes_finished,train/approx_kl,train/clip_fraction," \
                 "train/reward,time/rollout_s,time/update_s,train/env_steps"
        (run / "metrics.csv").write_text(header + "\n" + "\n".join(
            f"{u},{0.1 * u},10,0.01,0.1,-1,1,1,{16 * (u + 1)}" for u in range(4)) + "\n")
        for stage, step, epoch, value in (("sanity", 0, 0, 0.20), ("validate", 40, 3, 0.30 + 0.01 * seed)):
            metrics = {"id": {"success": value, "success_stderr": 0.05}}
            (run / "eval").mkdir(exist_ok=True)
            (run / "eval" / f"{stage}-step{step:07d}.json").write_text(
                json.dumps({"stage": stage, "step": step, "epoch": epoch, "metrics": metrics}))
        return {"command": " ".join(args), "wall_s": 10 + seed, "cpu_s": 20 + seed}

    monkeypatch.setattr(ppo_learning, "run_cli", fake_run_cli)
    return commands


def test_a_seeded_learning_run_plays_each_seed_from_one_checkpoint_and_records_the_spread(tmp_path, monkeypatch):
    commands = fake_learning_runs(monkeypatch)
    sft = tmp_path / "sft.ckpt"
    sft.write_text("")
    ppo_learning.main(["--task", "gp_l", "--sft", str(sft), "--seeds", "3", "--runs", str(tmp_path / "runs"),
                       "--out", str(tmp_path / "out")])
    assert [c[c.index("--seed_everything") + 1] for c in commands] == ["0", "1", "2"]
    assert all(c[c.index("--model.init_from") + 1] == str(sft) for c in commands)
    assert len({c[c.index("--trainer.default_root_dir") + 1] for c in commands}) == 3
    record = json.loads((tmp_path / "out" / "gp_l.json").read_text())
    assert [run["seed"] for run in record["seeds"]] == [0, 1, 2]
    assert record["gain"]["id"]["per_seed"] == pytest.approx([0.10, 0.11, 0.12])
    assert record["gain"]["id"]["beyond_two_stderr"]
    assert (tmp_path / "out" / "gp_l.png").exists()


def test_learning_runs_side_by_side_give_each_curve_its_gain_and_cost(tmp_path, monkeypatch, capsys):
    fake_learning_runs(monkeypatch)
    sft, out = tmp_path / "sft.ckpt", tmp_path / "out"
    sft.write_text("")
    for name, seeds in (("three", "3"), ("one", "1")):
        ppo_learning.main(["--task", "gp_l", "--sft", str(sft), "--seeds", seeds, "--name", name,
                           "--runs", str(tmp_path / "runs"), "--out", str(out)])
    capsys.readouterr()
    learning_curves.main([str(out / "three.json"), str(out / "one.json"), "--out", str(tmp_path / "both.png")])
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| three") or line.startswith("| one")}
    # three seeds: gains 0.10, 0.11, 0.12 -> +11.0 +- 0.6 over seeds (beyond); costs are means per seed
    assert rows["three"][1:7] == ["3", "id", "20.0 ± 0.0", "31.0 ± 0.6", "+11.0 ± 0.6", "yes"]
    assert rows["three"][7:12] == ["64", "11", "21", "4", "4 |"]  # attempts, wall, CPU, rollout, update
    # one seed: 0.20 -> 0.30 with binomial errors 0.05 each: +10.0 +- 7.1, within two standard errors
    assert rows["one"][1:7] == ["1", "id", "20.0 ± 5.0", "30.0 ± 5.0", "+10.0 ± 7.1", "no"]
    assert (tmp_path / "both.png").stat().st_size > 0


def test_learning_records_of_two_tasks_do_not_share_a_figure(tmp_path):
    for task in ("gp_l", "virl_l"):
        (tmp_path / f"{task}.json").write_text(json.dumps({"task": task, "metric": "train/success", "updates": [],
                                                            "validation": [{"update": 0, "id": 0.1}]}))
    with pytest.raises(SystemExit):
        learning_curves.main([str(tmp_path / "gp_l.json"), str(tmp_path / "virl_l.json"), "--out", "x.png"])
