"""Turn-level PPO with sequential revision, one Lightning epoch per update.

One action is one whole answer: its log-probability is the (optionally weighted, ``thought_coef``) sum over its
tokens (fp32, at the sampling temperature) and its state value comes from the value head on the prompt's last
token. Each update rolls the rank's environments on with the batched engine (episodes carry over from update to
update, as in the original trainer), computes GAE over attempts, then takes ``ppo_epochs`` passes of shuffled
mini-batches (gradients accumulate over micro-batches grouped by length). An update is an epoch: ``--ckpt_path``
resumes at an update boundary (with the same running episodes) and ``max_epochs`` counts updates.

The paper's MDP: an attempt that solves the task or uses up the attempt budget ends the episode (terminal: no
bootstrap after it; the budget's end carries the environment's budget penalty); only the rollout's end cuts an
episode, and the cut is bootstrapped from the value of the state it was cut in.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lit_sftrl.core.compute import ComputeConfig
from lit_sftrl.core.seeding import stream_seed
from lit_sftrl.core.validation import validate
from lit_sftrl.data.episodes import RolloutSpec
from lit_sftrl.data.tasks import make_env_from_spec, paper_buffer_ratio
from lit_sftrl.models.backbone import BackboneConfig, SamplingConfig
from lit_sftrl.run.progress import phase
from lit_sftrl.training.advantages import (
    CRITIC_FREE,
    attempt_advantages,
    compute_gae,
    episode_advantages,
    episode_returns,
    kl_penalised_rewards,
)
from lit_sftrl.training.evaluation import EpisodeMetrics
from lit_sftrl.training.micro_batches import PaddingMeter, attempt_lengths, by_length
from lit_sftrl.training.policy import OptimConfig, PolicyModule
from lit_sftrl.training.rollout import Attempt, EnvironmentPool, GroupedEpisodes, Rollout, RolloutEngine
from lit_sftrl.training.sharding import same_count_on_every_rank, whole_weights


@dataclass
class PPOConfig:
    """PPO hyper-parameters; what the paper ran (Llama-3.2-11B, 8 GPUs) stands beside each.

    Args:
        gamma: discount over attempts (paper 0.9).
        gae_lambda: GAE lambda (paper 0.95).
        clip_eps: surrogate clipping of the per-answer ratio (paper 0.1).
        value_clip: clipping of the value update around the rollout's values; 0 = no clipping (the paper clipped
            at 0.1, which lets V move at most 0.1 per update against returns of several units).
        value_coef: weight of the value loss (paper 0.5).
        entropy_coef: entropy bonus (paper 0, i.e. off).
        kl_coef: KL penalty to the reference policy: the ``init_from`` run, else the base model (paper 0: off).
            A loss term under every estimator but ``reinforce_pp``, which subtracts it from the reward instead
            (REINFORCE++'s form; see :attr:`kl_in_reward`).
        ppo_epochs: passes over each rollout (paper 4).
        minibatch_size: attempts per optimizer step, summed over all ranks (paper 1,024: 8 optimizer steps per
            update of 8 GPUs x 256 attempts x 4 epochs). Each rank takes ``minibatch_size / world_size``.
        micro_batch_size: most attempts per forward/backward and rank; long ones go fewer at a time (see
            :func:`lit_sftrl.training.micro_batches.by_length`). Gradients accumulate up to the mini-batch.
        max_grad_norm: gradient-norm clipping. The paper's config says 0.01, but under its DeepSpeed set-up the
            clipping was never applied.
        normalize_advantages: normalise GAE's advantages over the whole batch across ranks (``gae`` only: the
            critic-free estimators scale their own way).
        thought_coef: weight of the answer's tokens before its action field (``formula`` in GeneralPoints,
            ``action`` in V-IRL) in the answer's log-prob: 1.0 = a plain sum; the paper 0.5.
        value_lr_scale: the value head's learning rate over ``optim.lr`` (paper 1). The head starts fresh: at the
            policy's small rate it does not fit the returns in a short run, leaving advantages ~ returns.
        advantage: the estimator. ``gae`` (the paper's): a value head, GAE over attempts, episodes carried across
            updates. Critic-free (no value head; whole episodes, each start state played ``group_size`` times per
            update; every attempt takes its episode's advantage): ``grpo`` (return normalised within its group),
            ``rloo`` (return minus the mean of the group's other returns), ``reinforce_pp`` (return normalised
            over the whole batch). See ``docs/concepts/estimators.md``.
        group_size: episodes per start state under a critic-free estimator (None: 4 for ``grpo``/``rloo``, 1 for
            ``reinforce_pp``); ``gae`` takes none.
        scale_by_std: ``grpo`` divides by the group's standard deviation; False is Dr. GRPO's unscaled form.
    """

    gamma: float = 0.9
    gae_lambda: float = 0.95
    clip_eps: float = 0.1
    value_clip: float = 0.0
    value_coef: float = 0.5
    entropy_coef: float = 0.0
    kl_coef: float = 0.0
    ppo_epochs: int = 4
    minibatch_size: int = 32
    micro_batch_size: int = 8
    max_grad_norm: float = 1.0
    normalize_advantages: bool = True
    thought_coef: float = 1.0
    value_lr_scale: float = 1.0
    advantage: Literal["gae", "grpo", "rloo", "reinforce_pp"] = "gae"
    group_size: int | None = None
    scale_by_std: bool = True

    def __post_init__(self) -> None:
        validate(self, "ppo")
        if self.advantage not in ("gae", *CRITIC_FREE):
            raise ValueError(f"ppo.advantage: must be one of gae, {', '.join(CRITIC_FREE)}, got {self.advantage!r}")
        if self.advantage == "gae" and self.group_size is not None:
            raise ValueError("ppo.group_size: applies to critic-free estimators only (grpo, rloo, reinforce_pp), "
                             "not to advantage=gae")
        if self.advantage in ("grpo", "rloo") and self.group_size is not None and self.group_size < 2:
            raise ValueError(f"ppo.group_size: {self.advantage} compares episodes within a group and needs at least 2, "
                             f"got {self.group_size}")

    @property
    def critic_free(self) -> bool:
        return self.advantage != "gae"

    @property
    def episodes_per_group(self) -> int:
        """The group size in force: the configured one, else 4 (grpo, rloo) or 1 (reinforce_pp, gae)."""
        if self.group_size is not None:
            return self.group_size
        return 4 if self.advantage in ("grpo", "rloo") else 1

    @property
    def kl_in_reward(self) -> bool:
        """REINFORCE++ (Hu et al., 2025) charges the KL to the reference in the reward, before returns and the batch
        normalisation: each attempt's reward loses ``kl_coef`` x its summed log-ratio to the reference. It replaces
        the loss term rather than joining it: one coefficient in two places would charge the KL twice."""
        return self.advantage == "reinforce_pp" and self.kl_coef > 0


def answer_logprob(token_logprobs: torch.Tensor, token_weights: torch.Tensor | None) -> torch.Tensor:
    """log pi(answer | prompt): the sum of its tokens' log-probs, the reasoning tokens weighted by thought_coef."""
    if token_weights is None:
        return token_logprobs.sum()
    return (token_logprobs * token_weights.to(token_logprobs.device)).sum()


def ppo_loss(
    *, logprob: torch.Tensor, old_logprob: torch.Tensor, advantages: torch.Tensor,
    values: torch.Tensor | None, old_values: torch.Tensor, returns: torch.Tensor,
    entropy: torch.Tensor, kl: torch.Tensor, config: PPOConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The whole objective in one place: clipped surrogate + (clipped) value loss - entropy bonus + KL penalty.
    ``values`` None (critic-free): no value loss. ``kl`` is always reported; under ``config.kl_in_reward`` it is
    not in the loss."""
    log_ratio = logprob - old_logprob
    ratio = log_ratio.exp()
    surrogate = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - config.clip_eps, 1 + config.clip_eps))
    policy_loss = surrogate.mean()
    value_loss = torch.zeros((), device=logprob.device)
    if values is not None:  # critic-free estimators have no value head
        value_error = (values - returns) ** 2
        if config.value_clip > 0:
            clipped_values = old_values + (values - old_values).clamp(-config.value_clip, config.value_clip)
            value_error = torch.max(value_error, (clipped_values - returns) ** 2)
        value_loss = 0.5 * value_error.mean()
    kl_weight = 0.0 if config.kl_in_reward else config.kl_coef  # reinforce_pp charged it in the reward already
    loss = policy_loss + config.value_coef * value_loss - config.entropy_coef * entropy.mean() + kl_weight * kl.mean()
    with torch.no_grad():
        stats = {
            "policy_loss": policy_loss.detach(), "value_loss": value_loss.detach(),
            "entropy": entropy.detach().mean(), "kl_to_reference": kl.detach().mean(),
            "approx_kl": ((ratio - 1) - log_ratio).mean(),
            "clip_fraction": ((ratio - 1).abs() > config.clip_eps).float().mean(),
        }
    return loss, stats


def carried_episode_seeds(seed: int, rank: int) -> Callable[[int, int], tuple[int, dict]]:
    """GAE's episodes: environment ``i``'s ``n``-th episode of a rank, whatever update it starts in."""
    return lambda env_index, number: (stream_seed("ppo_episodes", seed, rank, env_index, number), {})


def carried_sampling_seeds(seed: int, rank: int, update: int) -> Callable[[int, int], int]:
    """GAE's sampling: the ``k``-th attempt environment ``i`` plays in an update (seeded per row, never by batch)."""
    return lambda env_index, k: stream_seed("ppo_sampling", seed, rank, update, env_index * 2**20 + k)


class PPOModule(PolicyModule):
    """PPO LightningModule over the backbone wrapper, with a value head (GAE) or without (critic-free estimators).

    Args:
        backbone: the model; ``value_head`` is switched on for ``ppo.advantage: gae`` and off otherwise.
        ppo: PPO hyper-parameters.
        sampling: decoding during rollouts (paper: temperature 0.2, up to 512 new tokens).
        optim: optimizer and learning-rate schedule; the schedule steps once per update, so ``warmup_steps``
            counts updates and ``cosine`` decays over the run's updates (paper: lr 1e-6, 1e-7 for V-IRL-VL).
        eval_sampling: decoding for validation/test episodes.
        init_from: an SFT run's Lightning checkpoint or exported directory: its weights (and LoRA adapters)
            but not its optimizer; the value head starts fresh; its FLOPs become this run's starting point.
        compute: how FLOPs are counted (real tokens, or the paper's approximation).
        max_nonfinite_losses: NaN/inf losses in a row after which the run stops (each skips its mini-batch).
        save_transcripts: write each evaluation's transcripts (prompt, answer, feedback, reward per attempt).
    """

    redo_interrupted_update = True  # Ctrl-C saves the state after the last finished update (RunCheckpoint)

    def __init__(
        self,
        backbone: BackboneConfig | None = None,
        ppo: PPOConfig | None = None,
        sampling: SamplingConfig | None = None,
        optim: OptimConfig | None = None,
        eval_sampling: SamplingConfig | None = None,
        init_from: str | None = None,
        compute: ComputeConfig | None = None,
        max_nonfinite_losses: int = 5,
        save_transcripts: bool = False,
    ) -> None:
        backbone = backbone or BackboneConfig()
        ppo = ppo or PPOConfig()
        backbone.value_head = not ppo.critic_free
        super().__init__(
            backbone, optim, eval_sampling, init_from, compute=compute, max_nonfinite_losses=max_nonfinite_losses,
            save_transcripts=save_transcripts,
        )
        self.automatic_optimization = False
        self.ppo = ppo
        self.uses_reference = bool(self.ppo.kl_coef)  # a frozen copy of the init_from run's weights, if any
        self.sampling = sampling or SamplingConfig(temperature=1.0)
        self.train_metrics = EpisodeMetrics()
        self.env_steps = 0
        self._pool: EnvironmentPool | GroupedEpisodes | None = None
        self._pool_states: list | None = None  # from a checkpoint: rebuilds each rank's running episodes
        self._scoring_s = 0.0  # the current update's scoring forwards (time/scoring_s)

    def parameter_groups(self) -> list[dict[str, Any]]:
        if self.backbone.value_head is None:
            return super().parameter_groups()
        head = [p for p in self.backbone.value_head.parameters() if p.requires_grad]
        ids = {id(p) for p in head}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": rest}, {"params": head, "lr": self.optim.lr * self.ppo.value_lr_scale}]

    def total_optimizer_steps(self) -> int:
        """The schedule's length: it steps once per update."""
        return max(1, self.trainer.max_epochs or 1)

    # ------------------------------------------------------------------------------------ update

    def training_step(self, spec: RolloutSpec, batch_idx: int) -> None:
        rollout = self._rollout(spec)
        advantages, returns = self._advantages(rollout.attempts)
        start, self._scoring_s = time.perf_counter(), 0.0
        with phase(self._trainer, "update", self.ppo.ppo_epochs * len(rollout.attempts), "attempts") as bar:
            stats, trained_tokens = self._optimize(spec, rollout.attempts, advantages, returns, bar.advance)
        self._count_compute(spec, rollout, trained_tokens)
        self._log_update(rollout, stats, time.perf_counter() - start, trained_tokens / self.trainer.world_size)
        self.lr_schedulers().step()

    def _rollout(self, spec: RolloutSpec) -> Rollout:
        engine = RolloutEngine(self.backbone, self.sampling, thought_coef=self.ppo.thought_coef)
        self.backbone.eval()  # no dropout during the whole update: the first PPO epoch's ratio starts at exactly 1
        with (
            torch.no_grad(), whole_weights(self.backbone),  # sharded: gathered once, no collective per step
            phase(self._trainer, "rollout", spec.rollout_steps, "attempts") as bar,
        ):
            if self.ppo.critic_free:
                rollout = engine.collect_groups(self._groups(spec), spec.rollout_steps, on_attempts=bar.advance)
            else:
                rollout = self._collect_carried_over(engine, spec, bar.advance)
        if self.ppo.kl_coef:  # sharded: the reference gathered once the policy's whole weights are freed
            with torch.no_grad(), whole_weights(self.backbone.reference_weights):
                self._reference_logprobs(rollout.attempts)
        return rollout

    def _groups(self, spec: RolloutSpec) -> GroupedEpisodes:
        """Critic-free episodes: groups numbered from 0 over the run, each group's members seeded apart."""
        if self._pool is None:
            envs = [make_env_from_spec(spec.env_id, spec.env_kwargs, spec.wrappers) for _ in range(spec.num_envs)]
            state = self._pool_states[spec.rank] if self._pool_states else None

            def episode_for(group: int) -> tuple[int, dict]:
                return stream_seed("ppo_groups", spec.seed, spec.rank, group), {}

            def seed_for(group: int, member: int, attempt: int) -> int:
                return stream_seed("ppo_group_sampling", spec.seed, spec.rank, group, member, attempt)

            self._pool = GroupedEpisodes(envs, self.ppo.episodes_per_group, episode_for, seed_for, state)
        return self._pool

    def _collect_carried_over(self, engine: RolloutEngine, spec: RolloutSpec, advance) -> Rollout:
        """GAE's rollout: the pool's running episodes go on from the last update; the rollout's end cuts them."""
        if self._pool is None:
            envs = [make_env_from_spec(spec.env_id, spec.env_kwargs, spec.wrappers) for _ in range(spec.num_envs)]
            state = self._pool_states[spec.rank] if self._pool_states else None

            self._pool = EnvironmentPool(envs, carried_episode_seeds(spec.seed, spec.rank), state)
        seed_for = carried_sampling_seeds(spec.seed, spec.rank, self.current_epoch)
        return engine.collect(self._pool, spec.rollout_steps, seed_for, on_attempts=advance)

    def _reference_logprobs(self, attempts: Sequence[Attempt]) -> None:
        for micro in by_length(range(len(attempts)), attempt_lengths(attempts), self.ppo.micro_batch_size):
            batch = [attempts[i] for i in micro]
            prompts, answers = [a.prompt for a in batch], [a.answer_ids for a in batch]
            scores = self.backbone.score(prompts, answers, self.sampling.temperature, reference=True)
            if self.compute.mode == "tokens":
                self.flops.add_inference(scores.num_tokens)
            for attempt, token_logprobs in zip(batch, scores.token_logprobs):
                attempt.reference_token_logprobs = token_logprobs.detach()

    def _advantages(self, attempts: Sequence[Attempt]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per attempt: (advantage, value target). Critic-free estimators have no value target (zeros)."""
        if self.ppo.critic_free:
            return self._critic_free_advantages(attempts), torch.zeros(len(attempts))
        advantages, returns = torch.zeros(len(attempts)), torch.zeros(len(attempts))
        by_env: dict[int, list[int]] = {}
        for index, attempt in enumerate(attempts):
            by_env.setdefault(attempt.env_index, []).append(index)
        for indices in by_env.values():
            sequence = [attempts[i] for i in indices]
            values = torch.tensor([a.value for a in sequence])
            next_values = torch.tensor([
                0.0 if a.terminated else a.bootstrap_value if a.truncated else values[t + 1].item()
                for t, a in enumerate(sequence)
            ])
            adv, ret = compute_gae(
                rewards=torch.tensor([a.reward for a in sequence]), values=values, next_values=next_values,
                episode_ends=torch.tensor([a.terminated or a.truncated for a in sequence]),
                gamma=self.ppo.gamma, lam=self.ppo.gae_lambda,
            )
            advantages[indices], returns[indices] = adv, ret
        if self.ppo.normalize_advantages:
            advantages = self._normalize_over_ranks(advantages)
        return advantages, returns

    def _critic_free_advantages(self, attempts: Sequence[Attempt]) -> torch.Tensor:
        """Each episode's return (the sum of its attempts' rewards) becomes its advantage against its group (or
        the batch: reinforce_pp), and every attempt of the episode takes it (see the advantages module)."""
        rewards = torch.tensor([a.reward for a in attempts], dtype=torch.float64)
        if self.ppo.kl_in_reward:
            rewards = kl_penalised_rewards(
                rewards=rewards, token_logprobs=[a.token_logprobs for a in attempts],
                reference_token_logprobs=[a.reference_token_logprobs for a in attempts], kl_coef=self.ppo.kl_coef,
            )
        episode_of, returns, groups = episode_returns(
            groups=[a.group for a in attempts], members=[a.member for a in attempts], rewards=rewards.tolist(),
        )
        per_episode = episode_advantages(
            returns=returns, groups=groups, estimator=self.ppo.advantage, scale_by_std=self.ppo.scale_by_std
        )
        if self.ppo.advantage == "reinforce_pp":  # normalised over every rank's episodes together
            per_episode = self._normalize_over_ranks(per_episode)
        return attempt_advantages(episode_of=episode_of, advantages=per_episode).float()

    def _normalize_over_ranks(self, advantages: torch.Tensor) -> torch.Tensor:
        moments = torch.stack(
            [advantages.new_tensor(len(advantages)), advantages.sum(), (advantages**2).sum()]
        ).to(self.device)
        n, total, squares = self.trainer.strategy.reduce(moments, reduce_op="sum").cpu().double().tolist()
        mean = total / n
        std = max(squares / n - mean**2, 0.0) ** 0.5
        return (advantages - mean) / (std + 1e-8)

    def _optimize(self, spec: RolloutSpec, attempts, advantages, returns, advance) -> tuple[dict[str, float], int]:
        optimizer = self.optimizers()
        per_rank = self.ppo.minibatch_size // self.trainer.world_size
        if per_rank < 1 or per_rank * self.trainer.world_size != self.ppo.minibatch_size:
            raise ValueError(
                f"model.ppo.minibatch_size={self.ppo.minibatch_size} must be a multiple of the "
                f"{self.trainer.world_size} ranks"
            )
        old_logprob = torch.stack([answer_logprob(a.token_logprobs, a.token_weights) for a in attempts])
        old_values = torch.tensor([a.value for a in attempts])
        generator = torch.Generator().manual_seed(stream_seed("ppo_shuffle", spec.seed, spec.rank, self.current_epoch))
        totals, weight, tokens, padding = {}, 0, 0, PaddingMeter.of(attempts)  # totals: stat -> sum
        for _ in range(self.ppo.ppo_epochs):
            order = torch.randperm(len(attempts), generator=generator).tolist()
            for minibatch in _chunks(order, per_rank):
                finite = True
                micro_batches = padding.split(minibatch, self.ppo.micro_batch_size)
                # Every forward/backward is a collective (gradient all-reduce, sharded weights' all-gathers): a rank
                # with fewer micro-batches than another runs extra ones, repeating its first, that weigh nothing.
                count = same_count_on_every_rank(self.trainer.strategy, len(micro_batches))
                for index in range(count):
                    real = index < len(micro_batches)
                    micro = micro_batches[index] if real else micro_batches[0]
                    loss, stats, n = self._micro_batch_loss(
                        [attempts[i] for i in micro], old_logprob=old_logprob[micro], old_values=old_values[micro],
                        advantages=advantages[micro], returns=returns[micro],
                    )
                    finite = self.loss_is_finite(loss)
                    if not finite:
                        break
                    self.manual_backward(loss * (len(micro) / len(minibatch) if real else 0.0))
                    if not real:
                        continue
                    tokens += n
                    advance(len(micro))
                    for key, value in stats.items():  # micro-batches differ in size: weigh by attempts
                        totals[key] = totals.get(key, 0.0) + float(value) * len(micro)
                    weight += len(micro)
                if finite:
                    self.clip_gradients(
                        optimizer, gradient_clip_val=self.ppo.max_grad_norm, gradient_clip_algorithm="norm"
                    )
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return {k: v / max(weight, 1) for k, v in totals.items()} | padding.shares(), self._sum_over_ranks(tokens)

    def _micro_batch_loss(self, batch: list[Attempt], *, old_logprob, old_values, advantages, returns):
        prompts, answers = [a.prompt for a in batch], [a.answer_ids for a in batch]
        start = time.perf_counter()
        scores = self.backbone.score(prompts, answers, self.sampling.temperature)
        self._scoring_s += time.perf_counter() - start
        device = scores.entropy.device
        logprob = torch.stack([answer_logprob(lp, a.token_weights) for lp, a in zip(scores.token_logprobs, batch)])
        kl = torch.zeros(len(batch), device=device)
        if self.ppo.kl_coef:
            kl = torch.stack(
                [_k3(new, a.reference_token_logprobs.to(device)) for new, a in zip(scores.token_logprobs, batch)]
            )
        loss, stats = ppo_loss(
            logprob=logprob, old_logprob=old_logprob.to(device), advantages=advantages.to(device),
            values=scores.values, old_values=old_values.to(device), returns=returns.to(device),
            entropy=scores.entropy, kl=kl, config=self.ppo,
        )
        return loss, stats, scores.num_tokens

    # ------------------------------------------------------------------------------------ accounting

    def _count_compute(self, spec: RolloutSpec, rollout: Rollout, trained_tokens: int) -> None:
        """Training tokens at 6N; rollout tokens at 2N, counted (``tokens``) or approximated as the paper did
        (``paper``: D_buffer = ratio x the update's training tokens)."""
        self.flops.add_training(trained_tokens)
        if self.compute.mode == "paper":
            ratio = self.compute.buffer_ratio or paper_buffer_ratio(spec.env_id)
            self.flops.add_inference(round(ratio * trained_tokens))
        else:
            self.flops.add_inference(self._sum_over_ranks(rollout.inference_tokens))

    def _log_update(self, rollout: Rollout, stats: dict[str, float], seconds: float, tokens_per_rank: float) -> None:
        totals = torch.tensor(rollout.totals(), dtype=torch.float64, device=self.device)
        n, reward, correct, finished_attempts, tokens = self.trainer.strategy.reduce(totals, reduce_op="sum").tolist()
        furthest = self.all_gather(torch.tensor(rollout.furthest(), device=self.device)).reshape(-1, 2).amax(0).tolist()
        self.train_metrics.update(rollout.finished)
        episode = self.train_metrics.compute()
        self.train_metrics.reset()
        self.env_steps += int(n)
        self.log_dict(
            {
                "train/reward": reward / n, **self._reward_components(rollout, n),
                "train/per_step_accuracy": correct / n,
                "train/episodes_finished": episode["episodes"],
                "train/attempts_per_episode": finished_attempts / max(episode["episodes"], 1),
                "train/max_attempt_index": float(furthest[0]), "train/max_rail_index": float(furthest[1]),
                "train/success": episode["success"], "train/well_formed": episode["well_formed"],
                "train/episode_return": self._mean_return(rollout.finished),
                **{f"train/{k}": v for k, v in stats.items()},
                "train/env_steps": float(self.env_steps), "train/rollout_tokens": tokens,
                "train/flops": self.flops.total, "train/update": float(self.current_epoch + 1),
                "train/lr": self.lr_schedulers().get_last_lr()[0],
                **rollout.timing(), "time/update_s": seconds, "time/update_tokens_per_s": tokens_per_rank / seconds,
                "time/scoring_s": self._scoring_s,  # the part of time/update_s spent in the scoring forwards
            }
        )
        self.log("reward", reward / n, prog_bar=True, logger=False)

    # ------------------------------------------------------------------------------------ helpers

    def _reward_components(self, rollout: Rollout, n: float) -> dict[str, float]:
        """``train/reward/<name>``: the mean per attempt of each component a reward wrapper reports in
        ``info["reward_components"]`` (the same names on every step, so every rank sums the same ones)."""
        sums = rollout.reward_components()
        if not sums:
            return {}
        summed = self.trainer.strategy.reduce(torch.tensor(list(sums.values()), dtype=torch.float64,
                                                           device=self.device), reduce_op="sum").tolist()
        return {f"train/reward/{name}": total / n for name, total in zip(sums, summed)}

    def _sum_over_ranks(self, value: int) -> int:
        return int(self.trainer.strategy.reduce(torch.tensor(float(value), device=self.device), reduce_op="sum"))

    def _mean_return(self, finished: list) -> float:
        pair = torch.tensor([sum(r.episode_return for r in finished), float(len(finished))], device=self.device)
        total, n = self.trainer.strategy.reduce(pair, reduce_op="sum").tolist()
        return total / n if n else 0.0

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["env_steps"] = self.env_steps
        checkpoint["rollout_state"] = self._gather_pool_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.env_steps = checkpoint.get("env_steps", 0)
        self._pool_states = checkpoint.get("rollout_state")
        self._pool = None

    def _gather_pool_states(self) -> list | None:
        """Every rank's running episodes (rank 0 writes the checkpoint; each rank resumes its own)."""
        local = self._pool.state_dict() if self._pool is not None else None
        if self._pool is None and self._pool_states is not None:
            local = self._pool_states[self.global_rank]
        if self.trainer.world_size == 1:
            return None if local is None else [local]
        gathered: list = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(gathered, local)
        return None if any(state is None for state in gathered) else gathered


def _k3(logprobs: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate exp(r) - r - 1 with r = ref - pi: non-negative, unbiased."""
    log_ratio = reference - logprobs
    return (log_ratio.exp() - log_ratio - 1).mean()


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]
