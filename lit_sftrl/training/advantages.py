"""Advantage estimators, each a small pure function: GAE (the paper's, with a value head) and the critic-free
GRPO / Dr. GRPO, RLOO and REINFORCE++ (no value head; a group of episodes from one start state is the baseline).

Critic-free estimators score whole episodes: every attempt of an episode (its revision turns included) gets the
advantage of the episode's return, computed against the other episodes of its group (GRPO, RLOO) or the whole
batch (REINFORCE++). Why the episode's return and not a per-attempt return-to-go: only the first attempts of a
group share a state (the same reset), so the group is a valid baseline for the episode as a whole; later attempts
sit in states that differ from member to member (different answers, different feedback), and a per-turn baseline
thins out (a turn that one member alone reached would get no signal). The return already charges every wrong
attempt its own reward, and the rewards an attempt did not cause (those before it) add variance, not bias.
``docs/concepts/estimators.md`` has the formulas and the argument in full.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

CRITIC_FREE = ("grpo", "rloo", "reinforce_pp")


def compute_gae(
    *, rewards: torch.Tensor, values: torch.Tensor, next_values: torch.Tensor, episode_ends: torch.Tensor,
    gamma: float, lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over one environment's attempts in time order; returns ``(advantages, returns)``.

    ``next_values[t]`` is V(s_{t+1}): 0 after a terminal attempt (success, budget used up), the cut state's own
    value after a cut, the next attempt's value otherwise. ``episode_ends[t]`` stops the advantage from flowing
    back across an episode boundary.
    """
    advantages = torch.zeros_like(rewards)
    running = 0.0
    for t in reversed(range(len(rewards))):
        delta = rewards[t] + gamma * next_values[t] - values[t]
        running = delta + gamma * lam * (1.0 - episode_ends[t].float()) * running
        advantages[t] = running
    return advantages, advantages + values


def group_normalized(*, returns: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: ``(R_i - mean R) / (std R + eps)`` over one group's returns [G] (std with Bessel's correction, as
    DeepSeekMath and TRL take it). ``scale_by_std=False`` is Dr. GRPO: ``R_i - mean R``, no division (which
    up-weights groups whose returns barely differ)."""
    centred = returns - returns.mean()
    return centred / (returns.std() + eps) if scale_by_std else centred


def leave_one_out(*, returns: torch.Tensor) -> torch.Tensor:
    """RLOO: ``R_i - mean_{j != i} R_j`` over one group's returns [G], G >= 2; the baseline of a sample never
    depends on the sample itself, so the estimate is unbiased."""
    size = len(returns)
    if size < 2:
        raise ValueError(f"leave-one-out needs a group of at least 2 episodes, got {size}")
    return returns - (returns.sum() - returns) / (size - 1)


def episode_advantages(*, returns: torch.Tensor, groups: torch.Tensor, estimator: str,
                       scale_by_std: bool = True) -> torch.Tensor:
    """Each episode's advantage [E] from its return [E] and its group number [E] (episodes of one group share a
    start state). ``reinforce_pp`` returns the raw returns: REINFORCE++ normalises them over the whole batch,
    ``(R_i - mean R) / (std R + eps)`` over every rank's episodes, which PPOModule does with the same reduction
    that normalises GAE's advantages."""
    if estimator == "reinforce_pp":
        return returns.clone()
    advantages = torch.empty_like(returns)
    for group in groups.unique():
        members = groups == group
        if estimator == "grpo":
            advantages[members] = group_normalized(returns=returns[members], scale_by_std=scale_by_std)
        elif estimator == "rloo":
            advantages[members] = leave_one_out(returns=returns[members])
        else:
            raise ValueError(f"unknown critic-free estimator {estimator!r}; one of {', '.join(CRITIC_FREE)}")
    return advantages


def episode_returns(
    *, groups: Sequence[int], members: Sequence[int], rewards: Sequence[float]
) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Attempts [A] (their group, member and reward) -> ``(episode_of [A], returns [E], groups [E])``: episodes in
    order of first appearance, each return the undiscounted sum of its attempts' rewards (revision turns
    included)."""
    index: dict[tuple[int, int], int] = {}
    episode_of = [index.setdefault((g, m), len(index)) for g, m in zip(groups, members)]
    returns = torch.zeros(len(index), dtype=torch.float64)
    returns.index_add_(0, torch.tensor(episode_of, dtype=torch.long), torch.tensor(list(rewards), dtype=torch.float64))
    episode_groups = torch.tensor([g for g, _ in index], dtype=torch.long)
    return episode_of, returns, episode_groups


def kl_penalised_rewards(
    *, rewards: torch.Tensor, token_logprobs: Sequence[torch.Tensor], reference_token_logprobs: Sequence[torch.Tensor],
    kl_coef: float,
) -> torch.Tensor:
    """REINFORCE++'s KL in the reward: each attempt's reward [A] minus ``kl_coef`` x its summed log-ratio to the
    reference, ``sum_t (log pi_old(y_t) - log pi_ref(y_t))`` over its tokens (the k1 estimate of the answer's KL,
    at the rollout's own log-probs). Hu et al. subtract ``kl_coef`` x each token's log-ratio from that token's
    reward; with one action per answer (turn-level), an answer's share is the sum over its tokens, and it enters the
    episode's return, hence the batch normalisation, like any other reward."""
    if not token_logprobs:
        return rewards.double()
    log_ratios = torch.stack([
        (policy.detach().double() - reference.detach().to(policy.device).double()).sum()
        for policy, reference in zip(token_logprobs, reference_token_logprobs, strict=True)
    ]).cpu()
    return rewards.double() - kl_coef * log_ratios


def attempt_advantages(*, episode_of: Sequence[int], advantages: torch.Tensor) -> torch.Tensor:
    """Every attempt [A] takes the advantage of its episode: ``episode_of[a]`` indexes ``advantages`` [E]."""
    return advantages[torch.as_tensor(list(episode_of), dtype=torch.long)]
