"""Every size and rate is checked when its config object is built, and the CLI lists every problem of a config
in one line each, naming the key, before anything runs (a zero num_envs used to loop forever, lr: .inf to turn
every weight NaN)."""

from __future__ import annotations

import math

import pytest

from lit_sftrl.data.datamodules import EvalConfig, RLDataModule, SFTDataModule
from lit_sftrl.data.tasks import TaskConfig
from lit_sftrl.models.config import BackboneConfig, LoraSettings, SamplingConfig
from lit_sftrl.training.policy import OptimConfig


@pytest.mark.parametrize("build, key", [
    (lambda: RLDataModule(num_envs=0), "data.num_envs"),
    (lambda: RLDataModule(rollout_steps=-3), "data.rollout_steps"),
    (lambda: SFTDataModule(batch_size=0), "data.batch_size"),
    (lambda: SFTDataModule(multi_turn=1.5), "data.multi_turn"),
    (lambda: OptimConfig(lr=math.inf), "optim.lr"),
    (lambda: OptimConfig(lr=float("nan")), "optim.lr"),
    (lambda: OptimConfig(lr=-1e-3), "optim.lr"),
    (lambda: OptimConfig(betas=(0.9, 1.5)), "optim.betas"),
    (lambda: SamplingConfig(max_new_tokens=0), "sampling.max_new_tokens"),
    (lambda: SamplingConfig(top_p=0.0), "sampling.top_p"),
    (lambda: SamplingConfig(temperature=math.inf), "sampling.temperature"),
    (lambda: TaskConfig(verify_iter=0), "task.verify_iter"),
    (lambda: TaskConfig(image_size=-1), "task.image_size"),
    (lambda: EvalConfig(chunk=0), "evaluation.chunk"),
    (lambda: LoraSettings(r=0), "lora.r"),
    (lambda: BackboneConfig(value_head_hidden=0), "backbone.value_head_hidden"),
    # the limits a config states on data (tests/test_limits.py shows each one enforced)
    (lambda: BackboneConfig(max_tokens=0), "backbone.max_tokens"),
    (lambda: SFTDataModule(max_image_pixels=0), "data.max_image_pixels"),
    (lambda: TaskConfig(max_image_pixels=-1), "task.max_image_pixels"),
    (lambda: TaskConfig(max_milestones=0), "task.max_milestones"),
])
def test_bad_sizes_and_rates_are_refused_at_construction(build, key):
    with pytest.raises(ValueError) as error:
        build()
    message = str(error.value)
    assert message.startswith(key) and "\n" not in message, message


def test_good_values_pass():
    RLDataModule(num_envs=1, rollout_steps=1)
    OptimConfig(lr=1e-6, schedule="cosine")
    TaskConfig(verify_iter=None)
    EvalConfig(val_episodes=0, test_episodes=None)


def test_cli_lists_every_problem_in_one_line_each(tmp_path):
    """num_envs 0 is refused at once (no model built, no rollout), lr: .inf from YAML too."""
    from lit_sftrl.cli import run

    overlay = tmp_path / "bad.yaml"
    overlay.write_text(
        "model:\n  init_args:\n    optim: {lr: .inf}\n    sampling: {max_new_tokens: 0}\n"
        "data:\n  init_args:\n    num_envs: 0\n    rollout_steps: -1\n    evaluation: {chunk: 0}\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", "configs/gp_l_ppo.yaml", "--config", str(overlay)])
    lines = str(exit_info.value.code).splitlines()
    assert lines[0].endswith("nothing was run:")
    keys = sorted(line.split(":")[0].strip() for line in lines[1:])
    assert keys == sorted(["model.optim.lr", "model.sampling.max_new_tokens", "data.num_envs", "data.rollout_steps",
                           "data.evaluation.chunk"]), lines


def test_misspelt_schedule_is_refused():
    """optim.schedule is a Literal: 'cosin' used to train at a constant learning rate."""
    from lit_sftrl.cli import run

    with pytest.raises(SystemExit):
        run(["fit", "--config", "configs/gp_l_sft.yaml", "--model.init_args.optim.schedule", "cosin"])
