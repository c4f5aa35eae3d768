"""Mistakes end in a short message that says what to do: misspelt keys (with the nearest key), enumerated
settings, predict (not offered), another run kind's checkpoint as --ckpt_path; the whole config reaches the
logger as hyperparameters."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bench import kill_resume
from lit_sftrl.cli import run


def _refusal(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run(argv)
    assert exit_info.value.code not in (0, None)
    captured = capsys.readouterr()
    return (captured.err + str(exit_info.value.code if isinstance(exit_info.value.code, str) else "")).strip()


@pytest.mark.parametrize("argv, expected", [
    (["--model.init_args.optim.lrr", "3"], "model.optim.lrr: no such setting; did you mean model.optim.lr?"),
    (["--data.init_args.batch_sise", "3"], "data.batch_sise: no such setting; did you mean data.batch_size?"),
    (["--trainer.max_stepz", "3"], "did you mean --trainer.max_steps?"),
    (["--model.init_args.optim.schedule", "cosin"], "model.optim.schedule: 'cosin' is not one of 'constant', 'cosine'"),
])
def test_a_misspelt_key_gets_a_short_message_with_the_nearest_key(capsys, argv, expected):
    message = _refusal(capsys, ["fit", "--config", "configs/gp_l_sft.yaml", *argv])
    assert expected in message and len(message.splitlines()) <= 3, message


def test_a_misspelt_key_in_a_yaml_file_fits_on_a_screen(capsys, tmp_path):
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  init_args:\n    optim: {lrr: 1}\n")
    message = _refusal(capsys, ["fit", "--config", "configs/gp_l_sft.yaml", "--config", str(typo)])
    assert "model.optim.lrr: no such setting; did you mean model.optim.lr?" in message
    assert len(message.splitlines()) <= 3


def test_predict_is_not_offered(capsys):
    run(["--help"])
    assert "predict" not in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        run(["predict"])
    assert "unknown command 'predict'" in str(exit_info.value.code)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_dir_factory) -> Path:
    folder = tmp_path_factory.mktemp("sft")
    run(["fit", "--config", str(kill_resume.write_config(folder / "run", tiny_dir_factory("mllama"), 1, 1))])
    return folder / "run"


def test_an_sft_checkpoint_as_ppo_ckpt_path_points_to_init_from(sft_run, tmp_path):
    ckpt = sft_run / "checkpoints" / "last.ckpt"
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", "configs/gp_l_ppo.yaml", "--ckpt_path", str(ckpt),
             "--trainer.default_root_dir", str(tmp_path / "ppo")])
    message = str(exit_info.value.code)
    assert "is a checkpoint of an SFT run" in message and f"--model.init_from {ckpt}" in message
    assert "\n" not in message


def test_the_whole_config_reaches_the_logger(sft_run):
    hparams = yaml.safe_load((sft_run / "hparams.yaml").read_text())
    assert hparams["model.optim.lr"] == 1.0e-3 and hparams["data.task.name"] == "gp_l"
    assert hparams["trainer.max_steps"] == 1 and "backbone" in hparams  # the module's own record is kept
