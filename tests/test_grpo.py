"""Critic-free RL (GRPO, RLOO, REINFORCE++) end to end on the tiny model: groups of whole episodes, no value head,
the toy task learnt as PPO learns it, an exact resume, a run through the CLI with the shipped GP-L config, and
two CPU DDP processes (groups per rank, REINFORCE++ normalised over both, an exact resume).

The estimators against hand-computed values are in ``test_advantages.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
@pytest.mark.slow
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


# ----------------------------------------------------------------------------------------------- DDP


def ddp_reinforce_pp(tiny: str, root: Path, max_epochs: int, *extra: str) -> list[list[dict]]:
    """``lit-sftrl fit`` as 2 CPU processes (gloo) under REINFORCE++ with groups of 2, on an environment whose
    rewards differ from sample to sample; each rank's probe records, update by update."""
    probe = json.dumps({"class_path": "ppo_rank_probe.PPORankProbe", "init_args": {"out": str(root / "probe")}})
    every_update = json.dumps({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
        "dirpath": str(root / "every_update"), "every_n_epochs": 1, "save_top_k": -1, "filename": "{epoch}",
        "save_on_train_epoch_end": True}})
    task = {"name": "add", "env": "tests.own_env_fixture:LengthBonusAdd", "env_kwargs": {"digits": 3, "attempts": 1},
            "verify_iter": None}
    command = [
        str(Path(sys.executable).parent / "lit-sftrl"), "fit", "--config", str(REPO / "configs" / "gp_l_ppo.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--trainer.max_epochs", str(max_epochs), "--trainer.num_sanity_val_steps", "0",
        "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
        f"--trainer.callbacks+={probe}", f"--trainer.callbacks+={every_update}",
        "--model.init_args.backbone.path", tiny, "--model.init_args.sampling.max_new_tokens", "4",
        "--model.init_args.sampling.temperature", "1.0",
        "--model.init_args.ppo.advantage", "reinforce_pp", "--model.init_args.ppo.group_size", "2",
        # minibatch_size counts both ranks: each rank's 4 attempts, one optimizer step per update.
        "--model.init_args.ppo.ppo_epochs", "1", "--model.init_args.ppo.minibatch_size", "8",
        "--model.init_args.ppo.micro_batch_size", "4", "--model.init_args.optim.lr", "1e-3",
        "--data.init_args.task", json.dumps(task), "--data.init_args.evaluation.val_episodes", "0",
        "--data.init_args.num_envs", "4", "--data.init_args.rollout_steps", "4", *extra,
    ]
    env = {
        **os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
    }
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return [[json.loads(line) for line in (root / "probe" / f"rank{r}.jsonl").read_text().splitlines()]
            for r in (0, 1)]


@pytest.mark.slow
def test_two_process_ddp_reinforce_pp_numbers_groups_per_rank_normalises_over_both_and_resumes_exactly(
    tiny, tmp_path
):
    unbroken = ddp_reinforce_pp(tiny, tmp_path / "unbroken", 2)
    for rank, records in enumerate(unbroken):
        assert [r["update"] for r in records] == [0, 1] and all(r["rank"] == rank for r in records)
        for update, record in enumerate(records):
            # Groups are numbered per rank over the run (2 groups of 2 single-attempt episodes per update), and
            # a group's members play one start state: the first batch holds groups 2u and 2u + 1, two each.
            assert sorted(map(tuple, record["episodes"])) == [(g, m) for g in (2 * update, 2 * update + 1)
                                                              for m in (0, 1)]
            prompts = record["prompts"]
            assert prompts[0] == prompts[1] and prompts[2] == prompts[3] and prompts[0] != prompts[2]
    for update in (0, 1):
        zero, one = unbroken[0][update], unbroken[1][update]
        assert zero["weights"] == one["weights"], f"ranks disagree after update {update + 1}"
        assert not set(zero["prompts"]) & set(one["prompts"]), "the ranks played the same start states"
        # REINFORCE++ normalises every rank's returns together (one attempt per episode: returns are rewards).
        rewards = torch.tensor(zero["rewards"] + one["rewards"], dtype=torch.float64)
        expected = (rewards - rewards.mean()) / (rewards.std(correction=0) + 1e-8)
        assert zero["advantages"] + one["advantages"] == pytest.approx(expected.tolist(), abs=1e-5)
        assert rewards.std() > 0

    def alone(record: dict) -> list[float]:  # what the rank's own normalisation would have given
        own = torch.tensor(record["rewards"], dtype=torch.float64)
        return ((own - own.mean()) / (own.std(correction=0) + 1e-8)).tolist()

    assert any(r["advantages"] != pytest.approx(alone(r), abs=1e-3) for records in unbroken for r in records)
    state = torch.load(tmp_path / "unbroken" / "checkpoints" / "last.ckpt", weights_only=True)["rollout_state"]
    assert state == [{"next_group": 4}, {"next_group": 4}]

    # Resumed from the checkpoint after update 1, update 2 is the unbroken run's, on both ranks, bit for bit.
    after_one = tmp_path / "unbroken" / "every_update" / "epoch=0.ckpt"
    resumed = ddp_reinforce_pp(tiny, tmp_path / "resumed", 2, "--ckpt_path", str(after_one))
    assert [[r["update"] for r in records] for records in resumed] == [[1], [1]]
    assert [records[0] for records in resumed] == [records[1] for records in unbroken]
