"""The learning-curve and study benches read back what the README quotes, and never evaluate on the test seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import ppo_learning, study


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
