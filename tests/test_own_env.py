"""Your own environment from YAML: an environment defined in tests/ (tests/own_env_fixture.py), named by import path,
trained by SFT and PPO and evaluated on two variants of its own; a reward wrapper from YAML shapes the reward and
logs its components; an environment that breaks the contract is refused in one line before any model is built;
the presets are the same environments as before, through the same mechanism; examples/own_env trains with the
command its docs page prints."""

from __future__ import annotations

import csv
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from bench import kill_resume
from lit_sftrl.cli import run
from lit_sftrl.data.tasks import TaskConfig
from lit_sftrl.envs import GENERAL_POINTS_ID, register_envs
from lit_sftrl.envs.contract import WRONG_ANSWER, ContractError, check_env
from lit_sftrl.report import Run, make_report, variants_of

REPO = Path(__file__).resolve().parents[1]
FIXTURE = "tests.own_env_fixture"
TASK = {"name": "add", "env": f"{FIXTURE}:AddEnv", "env_kwargs": {"attempts": 2},
        "variants": {"id": {"digits": 1}, "three_digit": {"digits": 3}}}
WRAPPER = {"wrapper": "examples.own_env.shaping:FormatPenalty", "kwargs": {"penalty": -0.5}}  # the how-to's
TRAINER = {"accelerator": "cpu", "devices": 1, "precision": "32-true", "enable_progress_bar": False,
           "enable_model_summary": False, "log_every_n_steps": 1, "num_sanity_val_steps": 0}


def write_yaml(folder: Path, kind: str, model: Path, task: dict, **data: object) -> Path:
    """A complete config for the tiny model: SFT (2 steps) or PPO (1 update of 4 attempts), evaluated at the end."""
    run_dir = folder / "run"
    if kind == "sft":
        trainer = {**TRAINER, "max_steps": 2, "val_check_interval": 2}
        module = {"class_path": "lit_sftrl.training.sft.SFTModule",
                  "init_args": {"optim": {"lr": 1.0e-3}}}
        datamodule = {"class_path": "lit_sftrl.data.datamodules.SFTDataModule", "init_args": {"batch_size": 2}}
    else:
        trainer = {**TRAINER, "max_epochs": 1, "check_val_every_n_epoch": 1}
        module = {"class_path": "lit_sftrl.training.ppo.PPOModule", "init_args": {
            "ppo": {"ppo_epochs": 1, "minibatch_size": 4, "micro_batch_size": 2},
            "sampling": {"temperature": 1.0, "max_new_tokens": 4}, "optim": {"lr": 1.0e-5}}}
        datamodule = {"class_path": "lit_sftrl.data.datamodules.RLDataModule",
                      "init_args": {"num_envs": 2, "rollout_steps": 4}}
    trainer |= {"default_root_dir": str(run_dir), "logger": {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": str(run_dir), "name": "", "version": "", "flush_logs_every_n_steps": 1}}}
    module["init_args"] |= {"backbone": {"path": str(model), "dtype": "float32"},
                            "eval_sampling": {"temperature": 0.0, "max_new_tokens": 4}}
    datamodule["init_args"] |= {"task": task, "seed": 0, "evaluation": {"val_episodes": 2, "chunk": 2}, **data}
    config = {"seed_everything": 0, "trainer": trainer, "model": module, "data": datamodule}
    path = folder / f"{kind}.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def metric_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


def eval_records(run_dir: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted((run_dir / "eval").glob("*.json"))]


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the import paths are relative to the repository root, as for a user


# ----------------------------------------------------------------------------------------------- the mechanism


def test_presets_are_environments_of_the_same_mechanism():
    """GP-L written out as an environment (its gymnasium id, keyword sets per variant) is the same task as the
    preset: same keyword arguments, same episodes."""
    register_envs()
    preset = TaskConfig(name="gp_l", verify_iter=3)
    shared = {"modality": "text", "target": 24, "verify_iter": 3}
    written = TaskConfig(env=GENERAL_POINTS_ID, variants={
        "id": {**shared, "face_card_rule": "10", "suits": "black"},
        "rule_ood": {**shared, "face_card_rule": "11-13", "suits": "black"}})
    assert preset.variant_names == written.variant_names == ("id", "rule_ood")
    for variant in preset.variant_names:
        assert preset.env_spec(variant)[1] == written.env_spec(variant)[1]
        assert preset.make_env(variant).reset(seed=7)[0] == written.make_env(variant).reset(seed=7)[0]


def test_a_preset_keeps_its_paper_variants_and_takes_more():
    task = TaskConfig(name="gp_vl", variants={"target_25": {"target": 25}})
    assert task.variant_names == ("id", "rule_ood", "visual_ood", "target_25")
    assert task.env_spec("visual_ood")[1]["suits"] == "red" and task.env_spec("target_25")[1]["target"] == 25


@pytest.mark.parametrize("task, message", [
    ({"name": "gp_x"}, "task.name: 'gp_x' is not a preset"),
    ({"env": f"{FIXTURE}:AddEnv", "variants": {"harder": {"digits": 2}}}, "no 'id' variant"),
    ({"env": f"{FIXTURE}:AddEnv", "variants": {"id": {}, "val/x": {}}}, "'val/x' is not a usable variant name"),
    ({"env": f"{FIXTURE}:AddEnv", "env_kwargs": {"digits": 1}, "variants": {"id": {"digits": 2}}},
     "task.variants.id.digits: also set in task.env_kwargs"),
    ({"env": f"{FIXTURE}:AddEnv", "variants": {"id": {"x": {"class_path": "logging.FileHandler"}}}},
     "task.variants.id.x: holds a 'class_path'"),
    ({"env": f"{FIXTURE}:AddEnv", "wrappers": [{"wrapper": "not an import path"}]},
     "task.wrappers.wrapper: 'not an import path' is not an import path"),
])
def test_bad_task_settings_are_refused_naming_the_key(task, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TaskConfig(**task)


def test_wrappers_wrap_training_and_only_when_asked_evaluation(in_repo):
    task = TaskConfig(**TASK, wrappers=[WRAPPER, {**WRAPPER, "kwargs": {"penalty": -2.0}, "apply_to_eval": True}])
    assert [kwargs["penalty"] for _, kwargs in task.wrapping()] == [-0.5, -2.0]
    assert [kwargs["penalty"] for _, kwargs in task.wrapping(evaluation=True)] == [-2.0]


# ----------------------------------------------------------------------------------------------- the contract


@pytest.fixture(scope="module")
def cities(tmp_path_factory) -> dict[str, str]:
    from lit_sftrl.envs.city import make_city

    root = tmp_path_factory.mktemp("cities")
    return {"routes": str(make_city(root / "metro", "metro", 6, seed=0, pano_width=64)),
            "ood_routes": str(make_city(root / "harbor", "harbor", 3, seed=0, pano_width=64))}


@pytest.mark.parametrize("name", ["gp_l", "gp_vl", "virl_l", "virl_vl"])
def test_the_built_in_environments_keep_the_contract(name, cities):
    task = TaskConfig(name=name, image_size=64, **(cities if name.startswith("virl") else {}))
    for variant in task.variant_names:
        check_env(task.make_env(variant), f"{name} {variant}", expert=True, suboptimal=True)


def test_the_fixture_environment_and_its_wrapper_keep_the_contract(in_repo):
    TaskConfig(**TASK, wrappers=[{**WRAPPER, "apply_to_eval": True}]).check_contract(expert=True)


@pytest.mark.parametrize("env, expert, message", [
    ("NoWellFormed", False, "step() info has no 'well_formed'; expected a bool"),
    ("TextReward", False, "step() reward is '0.0'; expected a finite number"),
    ("NoExpert", True, "has no expert_answer() method; expected one returning a str (SFT from expert play needs it)"),
])
def test_a_contract_break_is_one_line_naming_the_environment_and_the_key(in_repo, env, expert, message):
    with pytest.raises(ContractError) as error:
        TaskConfig(env=f"{FIXTURE}:{env}").check_contract(expert=expert)
    assert str(error.value).startswith(f"{FIXTURE}:{env} (variant 'id'): ") and message in str(error.value)
    assert "\n" not in str(error.value)


def test_an_environment_that_judges_a_wrong_answer_correct_is_refused(in_repo):
    from tests.own_env_fixture import AddEnv

    class AlwaysRight(AddEnv):
        def step(self, answer):
            return super().step(self.expert_answer())

    with pytest.raises(ContractError, match=re.escape(f"step({WRONG_ANSWER!r}) info['correct'] is True")):
        check_env(AlwaysRight(), "AlwaysRight")


def test_a_contract_break_stops_the_cli_before_any_model_is_built(in_repo, tmp_path, capsys, monkeypatch,
                                                                     tiny_dir_factory):
    from lit_sftrl.models import backbone

    config = write_yaml(tmp_path, "sft", tiny_dir_factory("mllama"), {**TASK, "env": f"{FIXTURE}:NoWellFormed"})
    monkeypatch.setattr(backbone.Backbone, "__init__", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", str(config)])
    header, *problems = str(exit_info.value.code).splitlines()
    assert header == "lit-sftrl fit: the config has problems, nothing was run:"
    assert problems == [f"  data.task.env: {FIXTURE}:NoWellFormed (variant 'id'): step() info has no 'well_formed'; "
                        "expected a bool (whether the answer parsed as the answer format; read for well-formedness)"]
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("kind, task, argv, expected", [
    ("sft", {**TASK, "variants": {"harder": {"digits": 2}}}, [],
     "  data.task.variants: no 'id' variant (the one trained on) among ['harder']"),
    ("ppo", TASK, ["--model.init_args.compute.mode", "paper"],
     "  model.compute.buffer_ratio: compute mode 'paper' needs it for your own environment (the paper measured it "
     "for GeneralPoints and V-IRL only)"),
])
def test_task_settings_the_parser_cannot_judge_are_refused_naming_the_key(in_repo, tmp_path, tiny_dir_factory,
                                                                         kind, task, argv, expected):
    config = write_yaml(tmp_path, kind, tiny_dir_factory("mllama"), task)
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", str(config), *argv])
    assert str(exit_info.value.code).splitlines()[1:] == [expected]


def test_an_unimportable_environment_is_one_line(in_repo, tmp_path, tiny_dir_factory):
    config = write_yaml(tmp_path, "sft", tiny_dir_factory("mllama"), {**TASK, "env": f"{FIXTURE}:Missing"})
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", str(config)])
    problems = str(exit_info.value.code).splitlines()[1:]
    assert len(problems) == 1 and f"cannot import '{FIXTURE}:Missing'" in problems[0]


# ----------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_dir_factory) -> Path:
    folder = tmp_path_factory.mktemp("own_sft")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        run(["fit", "--config", str(write_yaml(folder, "sft", tiny_dir_factory("mllama"), TASK))])
    return folder / "run"


def test_sft_from_yaml_alone_is_evaluated_on_the_variants_of_its_own(sft_run):
    (record,) = eval_records(sft_run)
    assert record["task"] == "add" and record["variants"] == ["id", "three_digit"]
    assert set(record["metrics"]) == {"id", "three_digit"} and record["metrics"]["three_digit"]["episodes"] == 2
    logged = set(metric_rows(sft_run)[0])
    assert {"val/id/success", "val/three_digit/success", "train/loss"} <= logged


def ppo_rows(folder: Path, model: Path, task: dict) -> dict[str, float]:
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        run(["fit", "--config", str(write_yaml(folder, "ppo", model, task))])
    rows = [row for row in metric_rows(folder / "run") if row.get("train/reward")]
    assert len(rows) == 1
    return {key: float(value) for key, value in rows[0].items() if value}


@pytest.mark.slow
def test_ppo_with_a_reward_wrapper_from_yaml_logs_its_components(tmp_path, tiny_dir_factory):
    model = tiny_dir_factory("mllama")
    plain = ppo_rows(tmp_path / "plain", model, TASK)
    shaped = ppo_rows(tmp_path / "shaped", model, {**TASK, "wrappers": [WRAPPER]})
    assert not any(key.startswith("train/reward/") for key in plain)
    # The same seeded rollout: the wrapper's task component is the environment's own reward, the format
    # component its shaping (an untrained tiny model answers no number: -0.5 each), and the reward their sum.
    assert shaped["train/reward/task"] == pytest.approx(plain["train/reward"])
    assert shaped["train/reward/format"] < 0
    assert shaped["train/reward"] == pytest.approx(shaped["train/reward/task"] + shaped["train/reward/format"])
    assert shaped["train/reward"] != pytest.approx(plain["train/reward"])
    (record,) = eval_records(tmp_path / "shaped" / "run")
    assert set(record["metrics"]) == {"id", "three_digit"}


def test_the_report_shows_an_environments_own_variants(sft_run, tmp_path):
    report = make_report([sft_run], tmp_path / "report").read_text()
    assert "| three_digit |" in report and "| id |" in report


def test_the_report_keeps_the_variants_in_the_order_the_records_list():
    record = {"metrics": {"aa": {}, "id": {}, "zz": {}}, "variants": ["id", "zz", "aa"]}
    assert variants_of([Run("r", [record], "SFT", "mine", None)]) == ["id", "zz", "aa"]


# ----------------------------------------------------------------------------------------------- the example


def documented_commands() -> list[str]:
    page = (REPO / "docs" / "how-to" / "own-environment.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", page, flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line.startswith("lit-sftrl fit")]


@pytest.mark.slow
def test_the_example_trains_with_the_command_its_page_prints(tmp_path, tiny_dir_factory):
    """The documented command, run as printed through the console script from the repository root (the example's
    module is found from the current directory), at tiny sizes through overrides only; then the PPO command
    from that SFT checkpoint."""
    sft, ppo = documented_commands()[:2]
    assert sft == "lit-sftrl fit --config examples/own_env/sft.yaml"
    tiny = ["--model.init_args.backbone.path", str(tiny_dir_factory("mllama")),
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--data.init_args.evaluation.val_episodes", "2", "--data.init_args.evaluation.chunk", "2",
            "--model.init_args.eval_sampling.max_new_tokens", "4", "--trainer.num_sanity_val_steps", "0"]
    sizes = {"sft": ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
                     "--data.init_args.batch_size", "2", "--trainer.default_root_dir", str(tmp_path / "sft")],
             "ppo": ["--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1",
                     "--data.init_args.num_envs", "2", "--data.init_args.rollout_steps", "4",
                     "--model.init_args.ppo.ppo_epochs", "1", "--model.init_args.ppo.minibatch_size", "4",
                     "--model.init_args.ppo.micro_batch_size", "2", "--model.init_args.sampling.max_new_tokens", "4",
                     "--trainer.default_root_dir", str(tmp_path / "ppo"),
                     "--model.init_from", str(tmp_path / "sft" / "checkpoints" / "last.ckpt")]}
    def config_run_directories() -> dict[Path, float]:
        """What the configs' own run directories hold: --trainer.default_root_dir puts the runs elsewhere."""
        return {path: path.stat().st_mtime for path in REPO.glob("checkpoints/reverse_*/**/*")}

    before = config_run_directories()
    for kind, command in (("sft", sft), ("ppo", ppo)):
        argv = [kill_resume.lit_sftrl_bin(), *shlex.split(command)[1:], *tiny, *sizes[kind]]
        done = subprocess.run(argv, cwd=REPO, env=kill_resume.child_env(), capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        (record,) = eval_records(tmp_path / kind)
        assert record["task"] == "reverse" and set(record["metrics"]) == {"id", "longer"}
    logged = set(metric_rows(tmp_path / "ppo")[0])
    assert {"train/reward/task", "train/reward/format"} <= logged
    assert config_run_directories() == before


@pytest.mark.parametrize("name", ["reverse.py", "shaping.py", "sft.yaml"])
def test_the_page_shows_the_example_files_as_they_are(name):
    page = (REPO / "docs" / "how-to" / "own-environment.md").read_text()
    assert (REPO / "examples" / "own_env" / name).read_text() in page


def test_the_readme_shows_the_example_and_the_command_the_page_runs():
    readme = (REPO / "README.md").read_text()
    assert (REPO / "examples" / "own_env" / "reverse.py").read_text() in readme
    shown_yaml = re.search(r"```yaml\n(data:\n.*?)```", readme, flags=re.S).group(1)
    assert shown_yaml in (REPO / "examples" / "own_env" / "sft.yaml").read_text()  # the config's own lines
    commands = re.findall(r"^lit-sftrl fit --config examples/own_env/\S+$", readme, flags=re.M)
    assert commands == [documented_commands()[0]]  # the command the test above runs, as printed
