"""``lit-sftrl study``: the whole protocol at tiny sizes, stopped between stages and resumed without redoing the
finished ones; its config refuses what cannot make a study; matched compute and overrides per stage."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from lit_sftrl.cli import run
from lit_sftrl.study import InitConfig, Study, StudyConfig, parse_study_config

REPO = Path(__file__).resolve().parents[1]


def small_rl_config(tmp: Path, tiny: Path) -> Path:
    """configs/gp_l_ppo.yaml, shrunk: 8 attempts of at most 4 tokens per update, a validation pass per update."""
    config = copy.deepcopy(yaml.safe_load((REPO / "configs/gp_l_ppo.yaml").read_text()))
    config["trainer"].update(accelerator="cpu", num_sanity_val_steps=0, check_val_every_n_epoch=1, log_every_n_steps=1,
                             enable_progress_bar=False, enable_model_summary=False)
    model = config["model"]["init_args"]
    model["backbone"]["path"] = str(tiny)
    model["sampling"]["max_new_tokens"] = 4
    model["eval_sampling"]["max_new_tokens"] = 8
    model["ppo"].update(ppo_epochs=1, minibatch_size=8, micro_batch_size=4)
    data = config["data"]["init_args"]
    data.update(num_envs=4, rollout_steps=8)
    data["task"]["verify_iter"] = 1
    data["evaluation"] = {"val_episodes": 2, "test_episodes": 3, "chunk": 2, "seed": 1234}
    path = tmp / "rl.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def configs(tmp_path, tiny_dir_factory) -> tuple[Path, Path]:
    from test_sft import small_config

    tiny = tiny_dir_factory("mllama")
    return small_config(tmp_path / "sft", tiny, steps=2, validate=True), small_rl_config(tmp_path, tiny)


@pytest.mark.slow
def test_a_study_runs_end_to_end_and_resumes_where_it_stopped(tmp_path, configs):
    sft_config, rl_config = configs
    out = tmp_path / "study"
    settings = {"out": str(out), "sft_config": str(sft_config), "rl_config": str(rl_config), "init": {"steps": 2},
                "rl_updates": 1, "test_episodes": 2, "rl_overrides": ["--model.init_args.ppo.kl_coef", "0.01"],
                "overrides": ["--trainer.num_sanity_val_steps", "0"], "in_process": True}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(settings))

    # A study that stops after RL (as one killed between stages would): Init and RL are done, nothing else.
    run(["study", "--config", str(tmp_path / "study.yaml"), "--stop_after", "rl"])
    record = json.loads((out / "study.json").read_text())
    assert list(record["stages"]) == ["init", "rl"] and all(s["finished"] for s in record["stages"].values())
    assert "seeds" not in record["config"]  # one seed: the record of a study made before seeds existed
    init_ckpt, rl_ckpt = out / "init" / "checkpoints" / "last.ckpt", out / "rl" / "checkpoints" / "last.ckpt"
    init_mtime = init_ckpt.stat().st_mtime_ns
    # RL killed mid-fit: recorded as started, not finished, with its last checkpoint on disk.
    record["stages"]["rl"]["finished"] = False
    (out / "study.json").write_text(json.dumps(record))

    record = run(["study", "--config", str(tmp_path / "study.yaml")])
    stages = record["stages"]
    assert list(stages) == ["init", "rl", "sft", "init_test", "sft_test", "rl_test", "report"]
    assert all(stage["finished"] and stage["command"].startswith("lit-sftrl ") for stage in stages.values())
    assert init_ckpt.stat().st_mtime_ns == init_mtime  # the finished Init was not redone
    assert "--ckpt_path last" in stages["rl"]["command"] and "--overwrite true" in stages["init"]["command"]
    # RL's overrides reach the RL fit and test alone; tests use the test seed, fits the validation seed.
    assert [name for name, s in stages.items() if "kl_coef" in s["command"]] == ["rl", "rl_test"]
    assert "--data.init_args.evaluation.seed 1234" in stages["rl_test"]["command"]
    assert "--data.init_args.evaluation.seed 4321" in stages["sft"]["command"]
    assert f"--trainer.max_steps {record['flops']['sft_steps']}" in stages["sft"]["command"]
    assert all(stage["cpu_s"] > 0 and stage["gpu_s"] == 0 for name, stage in stages.items() if name != "rl")
    report = (out / "report" / "report.md").read_text()
    assert "Matched compute: n/a" not in report and rl_ckpt.exists()
    headline = report.split("## Init / SFT / RL")[1].split("\n\n")[1]
    assert "| id | success |" in headline and "—" not in headline  # Init, SFT and RL bars at matched compute
    for folder in ("init_test", "sft", "rl"):
        assert any(p.name.startswith("test-") for p in (out / folder / "eval").iterdir()), folder

    # Run once more: everything is finished, nothing runs, nothing changes.
    before = (out / "study.json").read_text()
    run(["study", "--config", str(tmp_path / "study.yaml")])
    assert (out / "study.json").read_text() == before


def test_continued_sft_gets_the_steps_that_rls_extra_flops_buy(tmp_path, configs, monkeypatch):
    import lit_sftrl.study as study

    sft_config, rl_config = configs
    commands = []
    monkeypatch.setattr(study, "run_lit_sftrl", lambda args, in_process: commands.append(args))
    flops = {"init": 300e9, "rl": 450e9}  # 1 GFLOP per Init step, so RL's extra 150 GFLOPs buy 150 SFT steps
    monkeypatch.setattr(study, "inherited_flops", lambda path: flops[Path(path).parts[-3]])
    monkeypatch.setattr(study, "checkpoint_steps", lambda path: 300)
    config = StudyConfig(out=str(tmp_path / "out"), sft_config=str(sft_config), rl_config=str(rl_config),
                         init=InitConfig(steps=300), report=False)
    record = Study(config).run()
    sft_fit = commands[2]
    assert sft_fit[sft_fit.index("--trainer.max_steps") + 1] == "150" and record["flops"]["sft_steps"] == 150
    assert sft_fit[sft_fit.index("--model.init_args.init_from") + 1] == str(tmp_path / "out/init/checkpoints/last.ckpt")


@pytest.mark.parametrize("change, message", [
    ({"val_seed": 1234}, "draws the test episodes"),
    ({"rl_updates": 0}, "rl_updates: must be a positive integer"),
    ({"base_test": True}, "name it in study.base"),
    ({"stop_after": "nope"}, "not a stage of this study"),
    ({"rl_config": "missing.yaml"}, "rl_config: 'missing.yaml' is not a file"),
    ({"init": {"steps": 2, "checkpoint": "missing.ckpt"}}, "init.checkpoint: 'missing.ckpt' is not a checkpoint"),
])
def test_a_bad_study_config_is_one_line_naming_the_key(tmp_path, configs, change, message):
    sft_config, rl_config = configs
    settings = {"out": str(tmp_path / "out"), "sft_config": str(sft_config), "rl_config": str(rl_config), **change}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(settings))
    with pytest.raises(SystemExit) as exit_info:
        run(["study", "--config", str(tmp_path / "study.yaml")])
    assert message in str(exit_info.value.code) and str(exit_info.value.code).startswith("lit-sftrl study: ")


def test_a_study_record_of_another_config_is_not_resumed(tmp_path, configs, monkeypatch):
    import lit_sftrl.study as study

    sft_config, rl_config = configs
    monkeypatch.setattr(study, "run_lit_sftrl", lambda args, in_process: None)
    base = {"out": str(tmp_path / "out"), "sft_config": str(sft_config), "rl_config": str(rl_config)}
    Study(StudyConfig(**base, stop_after="init")).run()
    with pytest.raises(ValueError, match="records a study with another config"):
        Study(StudyConfig(**base, rl_updates=3))


def test_the_shipped_study_configs_parse(monkeypatch):
    monkeypatch.chdir(REPO)
    assert sorted(p.name for p in (REPO / "configs/study").glob("*.yaml")) == ["gp_l.yaml", "virl_l_grpo.yaml"]
    config = parse_study_config("configs/study/gp_l.yaml")
    assert config.stage_names() == ["init", "rl", "sft", "init_test", "sft_test", "rl_test", "report"]
    assert config.val_seed != config.test_seed and config.init.steps == 60 and config.seeds == 1
    config = parse_study_config("configs/study/virl_l_grpo.yaml")
    assert config.seeds == 3 and config.stage_names()[:7] == ["init", "rl_seed0", "rl_seed1", "rl_seed2", "sft_seed0",
                                                             "sft_seed1", "sft_seed2"]
    assert config.rl_overrides[:2] == ["--model.init_args.ppo.advantage", "grpo"]


@pytest.mark.slow
def test_the_grpo_study_config_runs_its_rl_arm_through_the_cli(tmp_path, tiny_dir_factory, monkeypatch):
    """configs/study/virl_l_grpo.yaml as a user runs it, shrunk by command-line overrides (a small synthetic city,
    2 Init steps, one GRPO update of 8 attempts of a few tokens), up to its first RL seed: a critic-free fit from
    Init with seed 0's seeds."""
    from lit_sftrl.envs.city import make_city

    monkeypatch.chdir(REPO)
    city = make_city(tmp_path / "metro", "metro", 6, seed=0, pano_width=64)
    tiny = tiny_dir_factory("mllama")
    out = tmp_path / "study"
    shrink = ["--trainer.accelerator", "cpu", "--trainer.num_sanity_val_steps", "0",
              "--trainer.limit_val_batches", "0", "--data.init_args.task.routes", str(city),
              "--model.init_args.eval_sampling.max_new_tokens", "8"]
    record = run(["study", "--config", "configs/study/virl_l_grpo.yaml", "--out", str(out), "--base", str(tiny),
                  "--init.steps", "2", "--rl_updates", "1", "--in_process", "true", "--stop_after", "rl_seed0",
                  "--overrides", json.dumps(shrink),
                  "--init.overrides", json.dumps(["--data.init_args.batch_size", "2"]),
                  # appended to the config's rl_overrides (GRPO's among them), which come after: later ones win
                  *[f"--rl_overrides+={arg}" for arg in [
                      "--data.init_args.rollout_steps", "8", "--data.init_args.num_envs", "4",
                      "--model.init_args.sampling.max_new_tokens", "8", "--model.init_args.ppo.minibatch_size", "8"]]])
    assert list(record["stages"]) == ["init", "rl_seed0"] and record["stages"]["rl_seed0"]["finished"]
    command = record["stages"]["rl_seed0"]["command"]
    assert "--model.init_args.ppo.advantage grpo" in command
    assert "--seed_everything 0 --data.init_args.seed 0" in command
    saved = yaml.safe_load((out / "rl_seed0" / "config.yaml").read_text())
    assert saved["model"]["init_args"]["ppo"]["advantage"] == "grpo" and saved["seed_everything"] == 0
    assert saved["data"]["init_args"]["rollout_steps"] == 8  # the test's sizes won over the config's 32
    assert (out / "rl_seed0" / "checkpoints" / "last.ckpt").exists()


@pytest.mark.slow
def test_stages_run_as_lit_sftrl_subprocesses_by_default_and_count_their_cpu(tmp_path, configs, tiny_dir_factory):
    """The default: each stage is the recorded ``lit-sftrl`` command in its own process; its CPU seconds are the
    child's. (The base's test alone, to stay short.)"""
    sft_config, rl_config = configs
    base = tiny_dir_factory("mllama")
    config = StudyConfig(out=str(tmp_path / "out"), sft_config=str(sft_config), rl_config=str(rl_config),
                         base=str(base), base_test=True, test_episodes=2, stop_after="base_test")
    record = Study(config).run()
    stage = record["stages"]["base_test"]
    assert stage["finished"] and stage["cpu_s"] > 0 and stage["command"].startswith(
        f"lit-sftrl test --config {sft_config} --model.init_args.backbone.path {base}")
    assert any(p.name.startswith("test-") for p in (tmp_path / "out" / "base_test" / "eval").iterdir())


def test_a_misspelt_study_key_is_named_in_short(tmp_path, configs, capsys):
    sft_config, rl_config = configs
    settings = {"out": str(tmp_path / "out"), "sft_config": str(sft_config), "rl_config": str(rl_config),
                "rl_update": 3}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(settings))
    with pytest.raises(SystemExit):
        run(["study", "--config", str(tmp_path / "study.yaml")])
    assert capsys.readouterr().err.splitlines() == [
        "lit-sftrl study: rl_update: no such setting", "(lit-sftrl study --help lists every setting)"]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_study_of_two_seeds_runs_each_arm_twice_from_one_init_and_reports_over_seeds(tmp_path, configs, capsys):
    """``seeds: 2`` through the command line: two RL and two continued SFT fits from the one Init, each seed's own
    training seeds, each SFT seed matched to its RL seed's FLOPs, every test on the same episodes; ``results``
    recomputes from the stage folders' test records; a resumed study skips the seeds that finished."""
    import statistics

    sft_config, rl_config = configs
    out = tmp_path / "study"
    settings = {"out": str(out), "sft_config": str(sft_config), "rl_config": str(rl_config), "init": {"steps": 2},
                "rl_updates": 1, "seeds": 2, "test_episodes": 2, "report": True, "in_process": True,
                "overrides": ["--trainer.num_sanity_val_steps", "0"]}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(settings))
    run(["study", "--config", str(tmp_path / "study.yaml"), "--stop_after", "sft_seed0"])
    checkpoints = {name: out / name / "checkpoints" / "last.ckpt" for name in ("init", "rl_seed0", "rl_seed1",
                                                                               "sft_seed0")}
    mtimes = {name: path.stat().st_mtime_ns for name, path in checkpoints.items()}
    capsys.readouterr()

    record = run(["study", "--config", str(tmp_path / "study.yaml")])
    console = capsys.readouterr().out
    assert all(f"study: {name} finished earlier, skipped" in console for name in checkpoints)
    assert {name: path.stat().st_mtime_ns for name, path in checkpoints.items()} == mtimes  # not redone
    stages = record["stages"]
    assert list(stages) == ["init", "rl_seed0", "rl_seed1", "sft_seed0", "sft_seed1", "init_test", "sft_test_seed0",
                            "sft_test_seed1", "rl_test_seed0", "rl_test_seed1", "report"]
    assert all(stage["finished"] for stage in stages.values())
    for seed in (0, 1):
        for arm in ("rl", "sft"):
            command = stages[f"{arm}_seed{seed}"]["command"]
            assert command.endswith(f"--seed_everything {seed} --data.init_args.seed {seed} --trainer."
                                    f"default_root_dir {out / f'{arm}_seed{seed}'} --overwrite true")
            assert "--seed_everything" not in stages[f"{arm}_test_seed{seed}"]["command"]  # the same test episodes
        # Each SFT seed gets the steps its own RL seed's FLOPs beyond Init buy.
        per_step = record["flops"]["init"] / 2
        steps = int((record["flops"][f"rl_seed{seed}"] - record["flops"]["init"]) // per_step)
        assert record["flops"][f"sft_steps_seed{seed}"] == steps >= 1
        assert f"--trainer.max_steps {steps} " in stages[f"sft_seed{seed}"]["command"]
    assert "--seeds 2" in stages["report"]["command"]

    results = record["results"]
    assert record["config"]["seeds"] == 2 and results["seeds"] == 2 and set(results["arms"]) == {"Init", "SFT", "RL"}
    for label, folders in {"Init": ["init_test"], "SFT": ["sft_seed0", "sft_seed1"],
                           "RL": ["rl_seed0", "rl_seed1"]}.items():
        arm = results["arms"][label]
        tests = [json.loads(next((out / folder / "eval").glob("test-*.json")).read_text()) for folder in folders]
        assert [r["run"] for r in arm["records"]] == folders and {r["stage"] for r in arm["records"]} == {"test"}
        assert [r["flops"] for r in arm["records"]] == [test["flops"] for test in tests]
        for variant in ("id", "rule_ood"):
            values = [test["metrics"][variant]["success"] for test in tests]
            score = arm["scores"][variant]
            assert [s["value"] for s in score["per_seed"]] == values
            assert [s["binomial_stderr"] for s in score["per_seed"]] == [
                test["metrics"][variant]["success_stderr"] for test in tests]
            assert score["mean"] == pytest.approx(statistics.mean(values))
            expected = statistics.stdev(values) / 2 ** 0.5 if len(values) > 1 else tests[0]["metrics"][variant][
                "success_stderr"]
            assert score["stderr"] == pytest.approx(expected)
        assert all(cpu["test"] > 0 and cpu["fit"] > 0 for cpu in arm["cpu_s"])
    for variant, verdict in results["verdict"].items():
        rl, init = results["arms"]["RL"]["scores"][variant], results["arms"]["Init"]["scores"][variant]
        gap = verdict["rl_minus_init"]
        assert gap["difference"] == pytest.approx(rl["mean"] - init["mean"])
        assert gap["stderr"] == pytest.approx((rl["stderr"] ** 2 + init["stderr"] ** 2) ** 0.5)
    report = (out / "report" / "report.md").read_text()
    assert "## Each seed" in report and "`sft_seed1`" in report and "## The sign pattern" in report
