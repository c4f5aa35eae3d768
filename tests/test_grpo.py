"""Critic-free RL (GRPO, RLOO) end to end on the tiny model: groups of whole episodes, no value head, the toy task
learnt as PPO learns it, an exact resume, and a run through the CLI with the shipped GP-L config.

The estimators against hand-computed values are in ``test_advantages.py``.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from test_cli import no_model_may_be_built  # noqa: F401 -- a fixture, used by name
from test_ppo import TOY_ID, Rewards, ToyData, make_trainer, probe_records, toy_module

from lit_sftrl.data.tasks import make_env_from_spec
from lit_sftrl.models.backbone import Backbone, BackboneConfig, SamplingConfig
from lit_sftrl.training.ppo import PPOConfig
from lit_sftrl.training.rollout import GroupedEpisodes, RolloutEngine

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tiny_dir_factory) -> str:
    return str(tiny_dir_factory("mllama"))


def test_a_group_plays_one_start_state_with_different_samples_and_only_whole_episodes(tiny):
    backbone = Backbone(BackboneConfig(path=tiny))
    envs = [make_env_from_spec(TOY_ID, {}) for _ in range(3)]  # fewer slots than a group: members queue
    pool = GroupedEpisodes(envs, 4, lambda group: (1000 + group, {}), lambda g, m, k: g * 100 + m * 10 + k)
    engine = RolloutEngine(backbone, SamplingConfig(temperature=1.0, max_new_tokens=3))
    with torch.no_grad():
        rollout = engine.collect_groups(pool, num_attempts=10)
    episodes: dict[tuple[int, int], list] = {}
    for attempt in rollout.attempts:
        episodes.setdefault((attempt.group, attempt.member), []).append(attempt)
    groups = sorted({group for group, _ in episodes})
    assert pool.next_group == len(groups) >= 2 and len(rollout.attempts) >= 10
    assert sorted(episodes) == [(g, m) for g in groups for m in range(4)]  # every group played in full
    assert len(rollout.finished) == len(episodes)
    for sequence in episodes.values():  # whole episodes: only the last attempt ends it
        assert [a.terminated or a.truncated for a in sequence] == [False] * (len(sequence) - 1) + [True]
    first_prompts = {key: sequence[0].prompt[0][0]["content"] for key, sequence in episodes.items()}
    for group in groups:  # one start state per group, sampled apart
        assert len({first_prompts[(group, m)] for m in range(4)}) == 1
        assert len({tuple(episodes[(group, m)][0].answer_ids.tolist()) for m in range(4)}) > 1
    assert len({first_prompts[(g, 0)] for g in groups}) == len(groups)  # groups start from different states
    assert all(a.value == 0.0 for a in rollout.attempts)  # nothing from a critic


def test_a_checkpoint_of_the_other_kind_of_rollout_is_refused_with_one_line():
    from lit_sftrl.training.rollout import EnvironmentPool

    envs = [make_env_from_spec(TOY_ID, {})]
    with pytest.raises(ValueError, match="running episodes of a run with ppo.advantage gae"):
        GroupedEpisodes(envs, 2, lambda g: (g, {}), lambda g, m, k: k, state=[{"episode": 0, "answers": []}])
    with pytest.raises(ValueError, match="checkpoint is of a critic-free run"):
        EnvironmentPool(envs, lambda i, n: (n, {}), state={"next_group": 3})


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_critic_free_estimators_raise_the_reward_of_the_toy_task_like_ppo(estimator, tiny, tmp_path):
    """The same toy, learning rate and budget as PPO's test in test_ppo.py, from chance to >= 0.9 of the maximum."""
    L.seed_everything(0)
    ppo = PPOConfig(ppo_epochs=4, minibatch_size=16, micro_batch_size=16, clip_eps=0.2, advantage=estimator,
                    group_size=4)
    module = toy_module(tiny, lr=1e-2, max_new_tokens=2, ppo=ppo)
    rewards = Rewards(stop_at=0.9)
    make_trainer(tmp_path, max_epochs=12, callbacks=[rewards]).fit(module, datamodule=ToyData(16, 64))
    print(estimator, "mean reward per update:", [round(r, 3) for r in rewards.values])
    assert rewards.values[0] <= 0.15  # near chance
    assert min(rewards.values[-2:]) >= 0.9, rewards.values
    assert module.backbone.value_head is None


def test_no_value_head_parameter_exists_under_a_critic_free_estimator(tiny):
    for estimator in ("grpo", "rloo", "reinforce_pp"):
        module = toy_module(tiny, lr=1e-3, max_new_tokens=2, ppo=PPOConfig(advantage=estimator))
        module.configure_model()
        names = [name for name, _ in module.named_parameters()]
        assert module.backbone.value_head is None and not module.backbone.config.value_head
        assert names and not any("value_head" in name for name in names)
        assert len(module.parameter_groups()) == 1
    gae = toy_module(tiny, lr=1e-3, max_new_tokens=2, ppo=PPOConfig())
    gae.configure_model()
    assert any("value_head" in name for name, _ in gae.named_parameters())  # the test can see a head


def test_resuming_a_grpo_run_continues_from_the_saved_update_exactly(tiny, tmp_path):
    from ppo_rank_probe import PPORankProbe

    def run(name: str, max_epochs: int, checkpoints: Path, ckpt_path: str | None = None):
        L.seed_everything(0)
        ppo = PPOConfig(ppo_epochs=2, minibatch_size=4, micro_batch_size=2, advantage="grpo", group_size=2)
        module = toy_module(tiny, lr=3e-3, max_new_tokens=3, ppo=ppo)
        trainer = make_trainer(tmp_path / name, max_epochs, [PPORankProbe(str(tmp_path / name))], checkpoints)
        trainer.fit(module, datamodule=ToyData(num_envs=4, rollout_steps=8, partial_credit=0.5), ckpt_path=ckpt_path)
        return trainer, module

    run("first", 2, tmp_path / "ckpt")  # "killed" after update 2, its checkpoint on disk
    resumed, module = run("resumed", 3, tmp_path / "ckpt", ckpt_path="last")
    unbroken, reference = run("unbroken", 3, tmp_path / "unbroken-ckpt")

    first, second, whole = (probe_records(tmp_path / name) for name in ("first", "resumed", "unbroken"))
    assert [r["update"] for r in first] == [0, 1] and [r["update"] for r in second] == [2]
    # Between updates a critic-free run carries only the next group's number: no episode is cut.
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["rollout_state"]
    assert len(state) == 1 and list(state[0]) == ["next_group"] and state[0]["next_group"] >= 2 * 2
    assert resumed.current_epoch == unbroken.current_epoch == 3
    assert resumed.global_step == unbroken.global_step
    assert module.env_steps == reference.env_steps
    assert [r["prompts"] for r in first + second] == [r["prompts"] for r in whole]
    assert first + second == whole  # same episodes, samples, optimizer state: the same weights, bit for bit
    assert len({r["weights"] for r in whole}) == 3


def test_grpo_through_the_cli_with_the_gp_l_config(tiny, tmp_path):
    from lit_sftrl.cli import run

    root = tmp_path / "run"
    run(["fit", "--config", str(REPO / "configs/gp_l_ppo.yaml"),
         "--model.init_args.ppo.advantage", "grpo", "--model.init_args.ppo.group_size", "2",
         "--model.init_args.backbone.path", tiny, "--model.init_args.sampling.max_new_tokens", "8",
         "--model.init_args.ppo.ppo_epochs", "1", "--model.init_args.ppo.minibatch_size", "4",
         "--data.init_args.num_envs", "2", "--data.init_args.rollout_steps", "4",
         "--data.init_args.evaluation.val_episodes", "0", "--trainer.num_sanity_val_steps", "0",
         "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
         "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root)])
    rows = (root / "metrics.csv").read_text().splitlines()
    header, values = rows[0].split(","), rows[-1].split(",")
    metrics = dict(zip(header, values))
    assert float(metrics["train/env_steps"]) >= 4 and metrics["train/value_loss"] in ("0.0", "0")
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    keys = list(checkpoint["state_dict"])
    assert keys and not any("value_head" in key for key in keys)
    assert checkpoint["rollout_state"] == [{"next_group": checkpoint["rollout_state"][0]["next_group"]}]
    assert checkpoint["rollout_state"][0]["next_group"] >= 1


def test_a_bad_estimator_combination_stops_the_cli_in_one_line_before_any_model(
    tmp_path, no_model_may_be_built  # noqa: F811
):
    from lit_sftrl.cli import run

    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", str(REPO / "configs/gp_l_ppo.yaml"), "--model.init_args.ppo.advantage", "rloo",
             "--model.init_args.ppo.group_size", "1", "--trainer.default_root_dir", str(tmp_path / "run")])
    message = str(exit_info.value.code)
    assert "ppo.group_size: rloo compares episodes within a group and needs at least 2, got 1" in message, message
    assert no_model_may_be_built == [] and not (tmp_path / "run").exists()
