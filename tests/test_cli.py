"""The lit-sftrl command line: every shipped config parses, --help lists every command, a bad config is refused
before any model is built, with a message naming the key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lit_sftrl.cli import run

REPO = Path(__file__).resolve().parents[1]
# configs/ holds LightningCLI configs, plus the tools' own: each of those is run by the test named here.
TOOL_CONFIGS = {"pretrain_base": "lit-sftrl pretrain --config (tests/test_pretrain.py)",
                "pretrain_rules": "lit-sftrl pretrain --config (tests/test_pretrain.py)"}
CONFIGS = sorted(path for path in (REPO / "configs").glob("*.yaml") if path.stem not in TOOL_CONFIGS)
# predict is not offered
COMMANDS = ("fit", "validate", "test", "make-tiny", "pretrain", "make-city", "export", "report")


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def test_the_configs_folder_holds_every_task_and_trainer():
    assert {path.stem for path in CONFIGS} >= {
        f"{task}_{kind}" for task in ("gp_l", "gp_vl", "virl_l", "virl_vl") for kind in ("sft", "ppo")
    }


@pytest.mark.parametrize("config", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_every_config_loads_through_the_cli_parser(config, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # the configs' relative paths (backbone, routes) are relative to the repository
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    written = yaml.safe_load(config.read_text())
    assert printed["model"]["class_path"] == written["model"]["class_path"]
    assert printed["data"]["class_path"] == written["data"]["class_path"]
    assert printed["data"]["init_args"]["task"]["name"] == written["data"]["init_args"]["task"]["name"]
    assert printed["trainer"]["logger"]["init_args"]["save_dir"] == f"checkpoints/{config.stem}"
    # The resolved config is complete: what the YAML left out comes back with its defaults.
    assert "dtype" in printed["model"]["init_args"]["backbone"]
    assert "val_episodes" in printed["data"]["init_args"]["evaluation"]


def test_help_lists_every_command(capsys):
    assert run(["--help"]) is None
    listed = capsys.readouterr().out
    for command in COMMANDS:
        assert f"  {command} " in listed
    result = subprocess.run(
        [sys.executable, "-m", "lit_sftrl.cli", "--help"],
        capture_output=True, text=True, env=subprocess_env(), timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert all(f"  {command} " in result.stdout for command in COMMANDS)


def test_an_unknown_command_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(["train"])
    assert "unknown command 'train'" in str(exit_info.value.code)


# ------------------------------------------------------------------------------------- bad configs


@pytest.fixture
def no_model_may_be_built(monkeypatch):
    """Building a backbone (or the tiny default) during the test fails it."""
    from lit_sftrl.models import backbone, tiny

    built = []

    def refuse(*args, **kwargs):
        built.append(args)
        raise AssertionError("a model was built from a bad config")

    monkeypatch.setattr(backbone.Backbone, "__init__", refuse)
    monkeypatch.setattr(tiny, "make_tiny", refuse)
    return built


BAD_OVERRIDES = {
    "unknown key": (["--model.init_args.backbone.nonsense", "1"], "nonsense"),
    "wrong type": (["--data.init_args.batch_size", "abc"], "batch_size"),
    "missing backbone": (["--model.backbone.path", "/nonexistent/model"], "model.backbone.path"),
    "missing backbone, init_args form": (
        ["--model.init_args.backbone.path", "/nonexistent/model"], "model.backbone.path"
    ),
    "missing init_from": (["--model.init_args.init_from", "/nonexistent/run.ckpt"], "model.init_from"),
    "missing ckpt_path": (["--ckpt_path", "/nonexistent/last.ckpt"], "ckpt_path"),
    "visual_ood on a text task": (["--data.init_args.evaluation.variants", "[visual_ood]"], "data.evaluation.variants"),
    "missing route folder": (
        ["--data.init_args.task.name", "virl_l", "--data.init_args.task.routes", "/nonexistent/routes"],
        "data.task.routes",
    ),
    "missing ood route folder": (
        ["--data.init_args.task.name", "virl_vl", "--data.init_args.task.ood_routes", "/nonexistent/vln_mini"],
        "data.task.ood_routes",
    ),
    "missing LLaVA JSON": (["--data.init_args.llava_json", "/nonexistent/sft.json"], "data.llava_json"),
}


@pytest.mark.parametrize("overrides, key", BAD_OVERRIDES.values(), ids=BAD_OVERRIDES.keys())
def test_a_bad_sft_config_stops_before_any_model_with_the_key_named(
    overrides, key, tmp_path, capsys, no_model_may_be_built
):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", str(REPO / "configs/gp_l_sft.yaml"), *overrides,
             "--trainer.default_root_dir", str(run_dir), "--trainer.logger.init_args.save_dir", str(run_dir)])
    code = exit_info.value.code
    assert code not in (0, None)
    message = (code if isinstance(code, str) else "") + capsys.readouterr().err
    assert key in message
    assert no_model_may_be_built == [] and not run_dir.exists()


def test_an_unknown_rl_training_variant_is_refused(tmp_path, no_model_may_be_built):
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", str(REPO / "configs/gp_l_ppo.yaml"), "--data.init_args.variant", "bogus",
             "--trainer.default_root_dir", str(tmp_path / "run")])
    assert "data.variant: variant 'bogus' does not apply to task 'gp_l'" in exit_info.value.code
    assert no_model_may_be_built == [] and not (tmp_path / "run").exists()


def test_an_unknown_key_in_a_yaml_file_is_refused(tmp_path, capsys, no_model_may_be_built):
    config = yaml.safe_load((REPO / "configs/gp_l_sft.yaml").read_text())
    config["model"]["init_args"]["optim"]["learning_rate"] = 0.1  # the key is "lr"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", str(path), "--trainer.default_root_dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert "learning_rate" in capsys.readouterr().err
    assert no_model_may_be_built == []


def test_every_problem_is_reported_at_once(no_model_may_be_built, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", str(REPO / "configs/gp_l_sft.yaml"), "--model.backbone.path", "/nonexistent/model",
             "--data.init_args.evaluation.variants", "[id, visual_ood]", "--trainer.default_root_dir", str(tmp_path)])
    message = exit_info.value.code
    assert "model.backbone.path" in message and "data.evaluation.variants" in message and "'visual_ood'" in message


def test_a_missing_tiny_default_is_not_a_problem(tmp_path, capsys):
    # tiny-<family> names are built on first use: only --print_config here, nothing is built.
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", str(REPO / "configs/gp_l_sft.yaml"),
             "--model.backbone.path", str(tmp_path / "tiny-mllama"), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert not (tmp_path / "tiny-mllama").exists()


def test_ddp_looks_for_unused_parameters():
    # A text task leaves the Mllama vision tower unused, which plain DDP rejects at its second step.
    from lit_sftrl.cli.trainer import ddp_strategy

    assert ddp_strategy("ddp") == "ddp_find_unused_parameters_true"
    assert ddp_strategy("ddp_spawn") == "ddp_spawn_find_unused_parameters_true"
    for kept in ("auto", "fsdp", "deepspeed_stage_2", "ddp_find_unused_parameters_false", None):
        assert ddp_strategy(kept) == kept


def test_the_command_line_exits_non_zero_naming_the_key():
    start = [sys.executable, "-m", "lit_sftrl.cli", "fit", "--config", str(REPO / "configs/gp_l_sft.yaml")]
    result = subprocess.run(
        start + ["--model.backbone.path", "/nonexistent/model"],
        capture_output=True, text=True, env=subprocess_env(), timeout=300, cwd=REPO,
    )
    assert result.returncode != 0
    assert "model.backbone.path: '/nonexistent/model' does not exist" in result.stderr
    assert "Traceback" not in result.stderr
