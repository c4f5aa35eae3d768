"""PPO end to end on the tiny model: it learns a toy task, starts from an SFT checkpoint's weights, resumes at
the saved update exactly, and runs as two CPU DDP processes with different episodes and identical weights.

GAE and the loss against hand-computed values are in ``test_ppo_math.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lit_sftrl.data.datamodules import RolloutSpecs, keep_as_is
from lit_sftrl.data.episodes import RolloutSpec
from lit_sftrl.envs.base import ChatEnv
from lit_sftrl.models.backbone import BackboneConfig, SamplingConfig
from lit_sftrl.training.policy import OptimConfig
from lit_sftrl.training.ppo import PPOConfig, PPOModule

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
TOY_ID = "lit_sftrl_tests/SaySeven-v0"



# ----------------------------------------------------------------------------------------------- toy task


class SaySevenEnv(ChatEnv):
    """Reward 1 when the answer starts with "7", else 0; the prompt also shows two random digits (noise).

    A random tiny model starts near chance (a few percent of its tokens start with a 7). A failed attempt gets a
    revision turn, and the second failure truncates the episode: GAE sees multi-attempt episodes too.
    ``partial_credit`` rewards an answer that starts with another digit (denser rewards for short runs).
    """

    def __init__(self, verify_iter: int = 2, partial_credit: float = 0.0) -> None:
        super().__init__()
        self.verify_iter, self.partial_credit = verify_iter, partial_credit
        self._attempt = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        a, b = self.np_random.integers(0, 10, size=2)
        self._start_conversation(f"Say 7. Noise: {a} {b}")
        self._attempt = 0
        return self._observation(), {}

    def step(self, action):
        self._attempt += 1
        success = action.strip().startswith("7")
        truncated = not success and self._attempt >= self.verify_iter
        if not success:
            self._revise(action, "your answer does not start with 7.")
        reward = 1.0 if success else self.partial_credit if action.strip()[:1].isdigit() else 0.0
        return self._observation(), reward, success, truncated, {"success": success, "correct": success}

    def expert_answer(self) -> str:
        return "7"


if TOY_ID not in gym.registry:
    gym.register(TOY_ID, entry_point=SaySevenEnv)


class ToyData(L.LightningDataModule):
    """What RLDataModule gives PPO (one RolloutSpec per update), for the toy environment."""

    def __init__(self, num_envs: int, rollout_steps: int, seed: int = 0, **env_kwargs) -> None:
        super().__init__()
        self.num_envs, self.rollout_steps, self.seed, self.env_kwargs = num_envs, rollout_steps, seed, env_kwargs

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer else 0
        spec = RolloutSpec(TOY_ID, self.env_kwargs, self.num_envs, self.rollout_steps, self.seed, rank)
        return DataLoader(RolloutSpecs(spec), batch_size=None, collate_fn=keep_as_is)


class Rewards(L.Callback):
    """Mean reward per attempt of every update; stops once two updates in a row reach ``stop_at``."""

    def __init__(self, stop_at: float | None = None) -> None:
        self.values: list[float] = []
        self.stop_at = stop_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(trainer.callback_metrics["train/reward"]))
        if self.stop_at is not None and len(self.values) >= 2 and min(self.values[-2:]) >= self.stop_at:
            trainer.should_stop = True


def make_trainer(root: Path, max_epochs: int, callbacks=(), checkpoints: Path | None = None) -> L.Trainer:
    callbacks = list(callbacks)
    if checkpoints is not None:
        callbacks.append(ModelCheckpoint(dirpath=checkpoints, every_n_epochs=1, save_last=True, save_top_k=-1))
    return L.Trainer(
        max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=checkpoints is not None,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        default_root_dir=root, callbacks=callbacks,
    )


@pytest.fixture(scope="module")
def tiny(tiny_dir_factory) -> str:
    return str(tiny_dir_factory("mllama"))


def toy_module(tiny: str, lr: float, max_new_tokens: int, ppo: PPOConfig, init_from: str | None = None) -> PPOModule:
    return PPOModule(
        backbone=BackboneConfig(path=tiny), ppo=ppo, optim=OptimConfig(lr=lr), init_from=init_from,
        sampling=SamplingConfig(temperature=1.0, max_new_tokens=max_new_tokens),
    )


# ----------------------------------------------------------------------------------------------- learning


@pytest.mark.slow
def test_ppo_raises_the_reward_of_a_toy_task_from_chance_to_the_maximum(tiny, tmp_path):
    L.seed_everything(0)
    ppo = PPOConfig(ppo_epochs=4, minibatch_size=16, micro_batch_size=16, clip_eps=0.2)
    module = toy_module(tiny, lr=1e-2, max_new_tokens=2, ppo=ppo)
    rewards = Rewards(stop_at=0.9)
    make_trainer(tmp_path, max_epochs=12, callbacks=[rewards]).fit(module, datamodule=ToyData(16, 64))
    print("mean reward per update:", [round(r, 3) for r in rewards.values])
    assert rewards.values[0] <= 0.15  # near chance
    assert min(rewards.values[-2:]) >= 0.9, rewards.values  # two updates in a row at >= 0.9 of the maximum (1)
    assert module.env_steps == 64 * len(rewards.values)


# ----------------------------------------------------------------------------------------------- init_from


def prompts_for_logits():
    import numpy as np

    from lit_sftrl.envs.general_points import GeneralPointsEnv

    text = GeneralPointsEnv()
    image = GeneralPointsEnv(modality="image", image_size=64)
    return [
        (text.reset(seed=1)[0]["messages"], None),
        (text.reset(seed=2)[0]["messages"], None),
        (image.reset(seed=3)[0]["messages"], np.asarray(image.reset(seed=3)[0]["image"])),
    ]


@torch.no_grad()
def logits_of(backbone, prompts) -> list[torch.Tensor]:
    was_training = backbone.training
    backbone.eval()
    out = [backbone.model(**backbone.encoder.encode_prompts([prompt])).logits for prompt in prompts]
    backbone.train(was_training)
    return out


class LogitsAtStart(L.Callback):
    def __init__(self, prompts) -> None:
        self.prompts, self.logits, self.values = prompts, None, None

    def on_train_start(self, trainer, pl_module) -> None:
        self.logits = logits_of(pl_module.backbone, self.prompts)
        self.values = pl_module.backbone.prompt_values(self.prompts)


def test_init_from_an_sft_checkpoint_reproduces_its_logits_at_update_zero(tiny, tmp_path):
    from lit_sftrl.data.datamodules import SFTDataModule
    from lit_sftrl.data.tasks import TaskConfig
    from lit_sftrl.training.sft import SFTModule

    L.seed_everything(0)
    sft = SFTModule(backbone=BackboneConfig(path=tiny), optim=OptimConfig(lr=1e-2))
    sft_trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path,
    )
    sft_trainer.fit(sft, datamodule=SFTDataModule(task=TaskConfig(name="gp_l"), batch_size=2))
    checkpoint = tmp_path / "sft.ckpt"
    sft_trainer.save_checkpoint(checkpoint)
    prompts = prompts_for_logits()
    expected = logits_of(sft.backbone, prompts)

    torch.manual_seed(123)
    ppo = PPOModule(backbone=BackboneConfig(path=tiny), init_from=str(checkpoint))
    ppo.configure_model()
    torch.manual_seed(123)
    fresh = PPOModule(backbone=BackboneConfig(path=tiny))
    fresh.configure_model()

    for got, want, base in zip(logits_of(ppo.backbone, prompts), expected, logits_of(fresh.backbone, prompts)):
        assert torch.equal(got, want)
        assert not torch.allclose(base, want, atol=1e-3)  # the SFT steps did move the weights
    # The value head starts fresh (SFT has none): as initialised without init_from, V = 0 everywhere.
    fresh_head = fresh.backbone.value_head.state_dict()
    for name, got in ppo.backbone.value_head.state_dict().items():
        assert torch.equal(got, fresh_head[name]), name
    assert torch.equal(ppo.backbone.prompt_values(prompts), torch.zeros(len(prompts)))
    # The compute already spent travels with the weights.
    assert ppo.flops.initial == pytest.approx(sft.flops.total) and ppo.flops.initial > 0

    # Through a Trainer: at the start of update 0 the policy is the SFT model.
    start = LogitsAtStart(prompts)
    ppo_config = PPOConfig(ppo_epochs=1, minibatch_size=4, micro_batch_size=4)
    module = toy_module(tiny, lr=1e-3, max_new_tokens=2, ppo=ppo_config, init_from=str(checkpoint))
    make_trainer(tmp_path / "ppo", max_epochs=1, callbacks=[start]).fit(module, datamodule=ToyData(2, 4))
    assert all(torch.equal(got, want) for got, want in zip(start.logits, expected))
    assert torch.equal(start.values, torch.zeros(len(prompts)))

    # With a KL term the reference is the SFT run it starts from (KL 0 at update 0), not the base model, and it
    # stays there while the policy moves.
    anchored = PPOModule(backbone=BackboneConfig(path=tiny), ppo=PPOConfig(kl_coef=0.1), init_from=str(checkpoint))
    anchored.configure_model()
    answer = anchored.backbone.tokenizer.encode('{"cards": ["A", "K"], "formula": "1+2"}', add_special_tokens=False)
    answers = [torch.tensor(answer)] * len(prompts)

    def scores(module, reference):
        with torch.no_grad():
            return module.backbone.score(prompts, answers, 1.0, reference=reference).logprob_sum

    torch.testing.assert_close(scores(anchored, True), scores(anchored, False), atol=1e-5, rtol=0)
    assert not torch.allclose(scores(anchored, True), scores(fresh, False), atol=1e-3)  # not the base model
    sft_scores = scores(anchored, False)
    with torch.no_grad():
        for param in anchored.backbone.model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    torch.testing.assert_close(scores(anchored, True), sft_scores, atol=1e-5, rtol=0)
    assert not torch.allclose(scores(anchored, False), sft_scores, atol=1e-3)


def test_init_from_a_checkpoint_with_a_value_head_still_starts_the_value_head_fresh(tiny, tmp_path):
    torch.manual_seed(5)
    source = PPOModule(backbone=BackboneConfig(path=tiny))
    source.configure_model()
    with torch.no_grad():
        for param in source.backbone.parameters():
            param.add_(0.01 * torch.randn_like(param))
    state = {f"backbone.{k}": v.clone() for k, v in source.backbone.trainable_state_dict().items()}
    checkpoint = tmp_path / "ppo.ckpt"
    hyper_parameters = {"backbone": dataclasses.asdict(source.backbone.config)}
    torch.save({"state_dict": state, "hyper_parameters": hyper_parameters}, checkpoint)

    torch.manual_seed(6)
    ppo = PPOModule(backbone=BackboneConfig(path=tiny), init_from=str(checkpoint))
    ppo.configure_model()
    torch.manual_seed(6)
    fresh = PPOModule(backbone=BackboneConfig(path=tiny))
    fresh.configure_model()
    fresh_state = fresh.backbone.trainable_state_dict()
    for name, value in ppo.backbone.trainable_state_dict().items():
        want = fresh_state[name] if name.startswith("value_head.") else state[f"backbone.{name}"]
        assert torch.equal(value, want), name


# ----------------------------------------------------------------------------------------------- resume


def probe_records(folder: Path) -> list[dict]:
    lines = (folder / "rank0.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_resuming_a_ppo_run_continues_from_the_saved_update_exactly(tiny, tmp_path):
    from ppo_rank_probe import PPORankProbe

    def run(name: str, max_epochs: int, checkpoints: Path, ckpt_path: str | None = None):
        L.seed_everything(0)
        ppo = PPOConfig(ppo_epochs=2, minibatch_size=4, micro_batch_size=2)
        module = toy_module(tiny, lr=3e-3, max_new_tokens=3, ppo=ppo)
        trainer = make_trainer(tmp_path / name, max_epochs, [PPORankProbe(str(tmp_path / name))], checkpoints)
        trainer.fit(module, datamodule=ToyData(num_envs=4, rollout_steps=10, partial_credit=0.5), ckpt_path=ckpt_path)
        return trainer, module

    run("first", 2, tmp_path / "ckpt")  # "killed" after update 2, its checkpoint on disk
    assert (tmp_path / "ckpt" / "last.ckpt").exists()
    resumed, module = run("resumed", 3, tmp_path / "ckpt", ckpt_path="last")
    unbroken, reference = run("unbroken", 3, tmp_path / "unbroken-ckpt")

    steps_per_update = 2 * 3  # ppo_epochs x ceil(10 / 4) mini-batches
    first, second, whole = (probe_records(tmp_path / name) for name in ("first", "resumed", "unbroken"))
    assert [r["update"] for r in first] == [0, 1] and [r["update"] for r in second] == [2]
    assert second[0]["global_step"] == 3 * steps_per_update and second[0]["env_steps"] == 30
    assert resumed.current_epoch == unbroken.current_epoch == 3
    assert resumed.global_step == unbroken.global_step == 3 * steps_per_update
    assert module.env_steps == reference.env_steps == 30
    # The checkpoint rebuilds the running episodes and sampling is seeded per (update, environment, attempt): the
    # resumed update is the unbroken run's third one, same episodes, same optimizer state and schedule, hence
    # the same weights, bit for bit.
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["rollout_state"]
    assert len(state) == 1 and len(state[0]) == 4 and any(env["answers"] for env in state[0])
    assert [r["prompts"] for r in first + second] == [r["prompts"] for r in whole]
    assert first + second == whole
    assert len({r["weights"] for r in whole}) == 3  # the updates did change the weights
    assert module.flops.total == pytest.approx(reference.flops.total)


# ----------------------------------------------------------------------------------------------- DDP


@pytest.mark.slow
def test_two_process_cpu_ddp_run_has_different_episodes_and_identical_weights(tiny, tmp_path):
    out = tmp_path / "probe"
    probe = json.dumps({"class_path": "ppo_rank_probe.PPORankProbe", "init_args": {"out": str(out)}})
    command = [
        str(Path(sys.executable).parent / "lit-sftrl"), "fit", "--config", str(REPO / "configs" / "gp_l_ppo.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--trainer.max_epochs", "2", "--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "0",
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "run"),
        f"--trainer.callbacks+={probe}",
        "--model.init_args.backbone.path", tiny, "--model.init_args.sampling.max_new_tokens", "4",
        # minibatch_size counts both ranks: 16 = each rank's 8 attempts, one optimizer step per update.
        "--model.init_args.ppo.ppo_epochs", "1", "--model.init_args.ppo.minibatch_size", "16",
        "--model.init_args.ppo.micro_batch_size", "4",
        "--data.init_args.num_envs", "4", "--data.init_args.rollout_steps", "8",
    ]
    env = {
        **os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
    }
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]

    ranks = [[json.loads(line) for line in (out / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    for rank, records in enumerate(ranks):
        assert [r["update"] for r in records] == [0, 1]
        assert all(r["world_size"] == 2 and r["rank"] == rank for r in records)
    for update in (0, 1):
        zero, one = ranks[0][update], ranks[1][update]
        assert zero["weights"] == one["weights"], f"ranks disagree after update {update + 1}"
        assert zero["global_step"] == one["global_step"] == update + 1
        assert zero["env_steps"] == one["env_steps"] == 2 * 8 * (update + 1)  # attempts of both ranks
        assert len(zero["prompts"]) == len(one["prompts"]) == 4
        assert not set(zero["prompts"]) & set(one["prompts"]), "the ranks played the same episodes"
    assert ranks[0][0]["weights"] != ranks[0][1]["weights"]
    # 2 attempts per environment and update against a budget of 5: update 2 continues update 1's episodes.
    assert ranks[0][0]["prompts"] == ranks[0][1]["prompts"]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
