"""Turn-level PPO with sequential revision (SPEC §5), one Lightning epoch per update.

One action is one whole answer: its log-probability is the sum over its tokens (fp32, at the sampling
temperature) and its state value comes from the value head on the prompt's last token. Each update rolls out
``num_envs`` environments per rank with the batched engine, computes GAE over attempts, then takes
``ppo_epochs`` passes of shuffled mini-batches (manual optimisation, gradient accumulation over micro-batches).
Because an update is an epoch, ``--ckpt_path`` resumes at an update boundary and ``max_epochs`` counts updates.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from itertools import count
from typing import Any, Iterator, Sequence

import torch

from lit_sftrl.datamodules import RolloutSpec, stream_rng
from lit_sftrl.evaluation import EpisodeMetrics
from lit_sftrl.models.backbone import BackboneConfig, SamplingConfig
from lit_sftrl.policy import OptimConfig, PolicyModule
from lit_sftrl.rollout import Attempt, RolloutEngine
from lit_sftrl.tasks import make_env_from_spec


@dataclass
class PPOConfig:
    """PPO hyper-parameters; the paper's value (Llama-3.2-11B, 8 GPUs) stands beside each.

    Args:
        gamma: discount over attempts (paper 0.9).
        gae_lambda: GAE lambda (paper 0.95).
        clip_eps: surrogate clipping (paper 0.1).
        value_clip: clipping of the value update around the rollout's values (paper: as clip_eps).
        value_coef: weight of the value loss (paper 0.5).
        entropy_coef: entropy bonus (paper 0, i.e. off).
        kl_coef: KL penalty to the reference policy (paper 0, i.e. off); under LoRA the reference is the
            adapter-disabled base model, so it costs no memory.
        ppo_epochs: passes over each rollout (paper 4).
        minibatch_size: attempts per optimizer step and rank.
        micro_batch_size: attempts per forward/backward (gradient accumulation up to ``minibatch_size``).
        max_grad_norm: gradient-norm clipping (paper 0.01).
        normalize_advantages: normalise advantages over the whole batch across ranks.
    """

    gamma: float = 0.9
    gae_lambda: float = 0.95
    clip_eps: float = 0.1
    value_clip: float = 0.1
    value_coef: float = 0.5
    entropy_coef: float = 0.0
    kl_coef: float = 0.0
    ppo_epochs: int = 4
    minibatch_size: int = 32
    micro_batch_size: int = 8
    max_grad_norm: float = 1.0
    normalize_advantages: bool = True


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, next_values: torch.Tensor, episode_ends: torch.Tensor,
    gamma: float, lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over one environment's attempts in time order; returns ``(advantages, returns)``.

    ``next_values[t]`` is V(s_{t+1}): 0 after a terminal attempt, the truncated state's own value after a
    truncation, the next attempt's value otherwise. ``episode_ends[t]`` stops the advantage from flowing
    back across an episode boundary.
    """
    advantages = torch.zeros_like(rewards)
    running = 0.0
    for t in reversed(range(len(rewards))):
        delta = rewards[t] + gamma * next_values[t] - values[t]
        running = delta + gamma * lam * (1.0 - episode_ends[t].float()) * running
        advantages[t] = running
    return advantages, advantages + values


def ppo_loss(
    logprob: torch.Tensor, old_logprob: torch.Tensor, advantages: torch.Tensor,
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
    entropy: torch.Tensor, kl: torch.Tensor, config: PPOConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The whole objective in one place: clipped surrogate + clipped value loss - entropy bonus + KL penalty."""
    log_ratio = logprob - old_logprob
    ratio = log_ratio.exp()
    surrogate = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - config.clip_eps, 1 + config.clip_eps))
    policy_loss = surrogate.mean()
    clipped_values = old_values + (values - old_values).clamp(-config.value_clip, config.value_clip)
    value_loss = 0.5 * torch.max((values - returns) ** 2, (clipped_values - returns) ** 2).mean()
    loss = policy_loss + config.value_coef * value_loss - config.entropy_coef * entropy.mean() + config.kl_coef * kl.mean()
    with torch.no_grad():
        stats = {
            "policy_loss": policy_loss.detach(), "value_loss": value_loss.detach(),
            "entropy": entropy.detach().mean(), "kl_to_reference": kl.detach().mean(),
            "approx_kl": ((ratio - 1) - log_ratio).mean(),
            "clip_fraction": ((ratio - 1).abs() > config.clip_eps).float().mean(),
        }
    return loss, stats


class PPOModule(PolicyModule):
    """PPO LightningModule over the backbone wrapper with a value head.

    Args:
        backbone: the model; ``value_head`` is switched on automatically.
        ppo: PPO hyper-parameters.
        sampling: decoding during rollouts (paper: temperature 0.2, up to 512 new tokens).
        optim: optimizer and learning-rate schedule, stepped per optimizer step (paper lr 1e-6; 1e-7 V-IRL-VL).
        eval_sampling: decoding for validation/test episodes (greedy by default).
        init_from: an SFT run's Lightning checkpoint or exported directory: its weights (and LoRA adapters)
            but not its optimizer; the value head starts fresh; its FLOPs become this run's starting point.
        max_nonfinite_losses: NaN/inf losses in a row after which the run stops (each skips its mini-batch).
    """

    def __init__(
        self,
        backbone: BackboneConfig | None = None,
        ppo: PPOConfig | None = None,
        sampling: SamplingConfig | None = None,
        optim: OptimConfig | None = None,
        eval_sampling: SamplingConfig | None = None,
        init_from: str | None = None,
        max_nonfinite_losses: int = 5,
    ) -> None:
        backbone = backbone or BackboneConfig()
        backbone.value_head = True
        super().__init__(backbone, optim, eval_sampling, init_from, max_nonfinite_losses)
        self.automatic_optimization = False
        self.ppo = ppo or PPOConfig()
        self.sampling = sampling or SamplingConfig(temperature=1.0)
        self.train_metrics = EpisodeMetrics()
        self.env_steps = 0
        self._train_envs: list | None = None

    def total_optimizer_steps(self) -> int:
        """For the learning-rate schedule: updates (epochs) x optimizer steps per update."""
        rollout_steps = getattr(self.trainer.datamodule, "rollout_steps", self.ppo.minibatch_size)
        return max(1, self.trainer.max_epochs or 1) * self.optimizer_steps_per_update(rollout_steps)

    def optimizer_steps_per_update(self, rollout_steps: int) -> int:
        return self.ppo.ppo_epochs * -(-rollout_steps // self.ppo.minibatch_size)

    # ------------------------------------------------------------------------------------ update

    def training_step(self, spec: RolloutSpec, batch_idx: int) -> None:
        attempts, finished, rollout_tokens = self._rollout(spec)
        advantages, returns = self._advantages(attempts)
        stats = self._optimize(attempts, advantages, returns)
        tokens = self._sum_over_ranks(rollout_tokens)
        self.flops.add_inference(tokens)
        self.train_metrics.update(finished)
        episode = self.train_metrics.compute()
        self.train_metrics.reset()
        rewards = torch.tensor([a.reward for a in attempts], dtype=torch.float32, device=self.device)
        self.env_steps += int(self._sum_over_ranks(len(attempts)))
        self.log_dict(
            {
                "train/reward": self.trainer.strategy.reduce(rewards.mean(), reduce_op="mean"),
                "train/episode_return": self._mean_return(finished),
                **{f"train/{k}": v for k, v in episode.items() if not k.endswith("_stderr")},
                **{f"train/{k}": v for k, v in stats.items()},
                "train/env_steps": float(self.env_steps),
                "train/rollout_tokens": float(tokens),
                "train/flops": self.flops.total,
                "train/update": float(self.current_epoch + 1),
            },
            prog_bar=False,
        )
        self.log("reward", rewards.mean(), prog_bar=True, logger=False)

    def _rollout(self, spec: RolloutSpec) -> tuple[list[Attempt], list, int]:
        if self._train_envs is None:
            self._train_envs = [make_env_from_spec(spec.env_id, spec.env_kwargs) for _ in range(spec.num_envs)]
        engine = RolloutEngine(self.backbone, self.sampling)
        # No dropout during the whole update: the ratio of the first PPO epoch must start at exactly 1.
        self.backbone.eval()
        # Sampling, like the episodes, is seeded by (seed, rank, update): a resumed run samples exactly the
        # answers an unbroken one would (the global RNG is not in checkpoints), and ranks sample independently.
        sampling_seed = int(stream_rng(spec.seed, spec.rank, self.current_epoch, 0, 0).integers(2**63))
        with torch.no_grad(), _forked_rng(self.device, sampling_seed):
            attempts, finished = engine.collect(self._train_envs, self._episodes(spec), spec.rollout_steps)
            if self.ppo.kl_coef:
                self._reference_logprobs(attempts)
        return attempts, finished, engine.inference_tokens

    def _episodes(self, spec: RolloutSpec) -> Iterator[tuple[int, dict]]:
        """Seeds depend on the update, so a resumed run replays exactly the episodes an unbroken one would."""
        for n in count():
            yield int(stream_rng(spec.seed, spec.rank, self.current_epoch, n).integers(2**31)), {}

    def _reference_logprobs(self, attempts: Sequence[Attempt]) -> None:
        for batch in _chunks(list(attempts), self.ppo.micro_batch_size):
            scores = self.backbone.score([a.prompt for a in batch], [a.answer_ids for a in batch], self.sampling.temperature, reference=True)
            self.flops.add_inference(scores.num_tokens)
            for attempt, token_logprobs in zip(batch, scores.token_logprobs):
                attempt.reference_token_logprobs = token_logprobs.detach()

    def _advantages(self, attempts: Sequence[Attempt]) -> tuple[torch.Tensor, torch.Tensor]:
        advantages = torch.zeros(len(attempts))
        returns = torch.zeros(len(attempts))
        by_env: dict[int, list[int]] = {}
        for index, attempt in enumerate(attempts):
            by_env.setdefault(attempt.env_index, []).append(index)
        for indices in by_env.values():
            sequence = [attempts[i] for i in indices]
            values = torch.tensor([a.value for a in sequence])
            next_values = torch.tensor(
                [0.0 if a.terminated else a.bootstrap_value if a.truncated else values[t + 1].item() for t, a in enumerate(sequence)]
            )
            ends = torch.tensor([a.terminated or a.truncated for a in sequence])
            rewards = torch.tensor([a.reward for a in sequence])
            adv, ret = compute_gae(rewards, values, next_values, ends, self.ppo.gamma, self.ppo.gae_lambda)
            advantages[indices], returns[indices] = adv, ret
        if self.ppo.normalize_advantages:
            advantages = self._normalize_over_ranks(advantages)
        return advantages, returns

    def _normalize_over_ranks(self, advantages: torch.Tensor) -> torch.Tensor:
        moments = torch.stack([advantages.new_tensor(len(advantages)), advantages.sum(), (advantages**2).sum()]).to(self.device)
        n, total, squares = self.trainer.strategy.reduce(moments, reduce_op="sum").cpu().double().tolist()
        mean = total / n
        std = max(squares / n - mean**2, 0.0) ** 0.5
        return (advantages - mean) / (std + 1e-8)

    def _optimize(self, attempts: Sequence[Attempt], advantages: torch.Tensor, returns: torch.Tensor) -> dict[str, float]:
        optimizer, schedule = self.optimizers(), self.lr_schedulers()
        old_logprob = torch.tensor([a.logprob for a in attempts])
        old_values = torch.tensor([a.value for a in attempts])
        generator = torch.Generator().manual_seed(int(stream_rng(self.current_epoch, self.global_rank).integers(2**31)))
        totals: dict[str, float] = {}
        batches = 0
        for _ in range(self.ppo.ppo_epochs):
            order = torch.randperm(len(attempts), generator=generator).tolist()
            for minibatch in _chunks(order, self.ppo.minibatch_size):
                finite = True
                for micro in _chunks(minibatch, self.ppo.micro_batch_size):
                    loss, stats = self._micro_batch_loss([attempts[i] for i in micro], micro, old_logprob, old_values, advantages, returns)
                    finite = self.loss_is_finite(loss)
                    if not finite:
                        break
                    self.manual_backward(loss * len(micro) / len(minibatch))
                    for key, value in stats.items():
                        totals[key] = totals.get(key, 0.0) + float(value)
                    batches += 1
                if finite:
                    self.clip_gradients(optimizer, gradient_clip_val=self.ppo.max_grad_norm, gradient_clip_algorithm="norm")
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                schedule.step()
        self.log("train/lr", schedule.get_last_lr()[0])
        return {key: value / max(batches, 1) for key, value in totals.items()}

    def _micro_batch_loss(self, batch, indices, old_logprob, old_values, advantages, returns):
        scores = self.backbone.score([a.prompt for a in batch], [a.answer_ids for a in batch], self.sampling.temperature)
        self.flops.add_training(self._sum_over_ranks(scores.num_tokens))
        device = scores.logprob_sum.device
        index = torch.tensor(indices)
        kl = torch.zeros(len(batch), device=device)
        if self.ppo.kl_coef:
            kl = torch.stack([_k3(new, a.reference_token_logprobs.to(device)) for new, a in zip(scores.token_logprobs, batch)])
        return ppo_loss(
            scores.logprob_sum, old_logprob[index].to(device), advantages[index].to(device),
            scores.values, old_values[index].to(device), returns[index].to(device),
            scores.entropy, kl, self.ppo,
        )

    # ------------------------------------------------------------------------------------ helpers

    def _sum_over_ranks(self, value: int) -> int:
        return int(self.trainer.strategy.reduce(torch.tensor(float(value), device=self.device), reduce_op="sum"))

    def _mean_return(self, finished: list) -> float:
        pair = torch.tensor([sum(r.episode_return for r in finished), float(len(finished))], device=self.device)
        total, n = self.trainer.strategy.reduce(pair, reduce_op="sum").tolist()
        return total / n if n else 0.0

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["env_steps"] = self.env_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.env_steps = checkpoint.get("env_steps", 0)


@contextlib.contextmanager
def _forked_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Seed the RNG that sampling on ``device`` draws from, restoring the global RNG state afterwards."""
    accelerator = device.type not in ("cpu", "meta")
    devices = [device] if accelerator and device.index is not None else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if accelerator else "cuda"):
        torch.manual_seed(seed)
        yield


def _k3(logprobs: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate exp(r) - r - 1 with r = ref - pi: non-negative, unbiased."""
    log_ratio = reference - logprobs
    return (log_ratio.exp() - log_ratio - 1).mean()


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
