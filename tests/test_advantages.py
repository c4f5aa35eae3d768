"""The critic-free estimators against values computed by hand, on a fixed group, with and without revision turns.

GAE against hand-computed values is in ``test_ppo_math.py``.
"""

import dataclasses

import pytest
import torch

from lit_sftrl.training.advantages import (
    attempt_advantages,
    episode_advantages,
    episode_returns,
    group_normalized,
    kl_penalised_rewards,
    leave_one_out,
)
from lit_sftrl.training.ppo import PPOConfig, PPOModule, ppo_loss
from lit_sftrl.training.rollout import Attempt

RETURNS = torch.tensor([1.0, 0.0, 0.0, 1.0])  # one group of four single-attempt episodes: mean 0.5
SAMPLE_STD = (4 * 0.25 / 3) ** 0.5  # Bessel-corrected, as DeepSeekMath and TRL: sqrt(1/3)


def test_grpo_divides_by_the_groups_sample_std():
    expected = [0.5 / SAMPLE_STD, -0.5 / SAMPLE_STD, -0.5 / SAMPLE_STD, 0.5 / SAMPLE_STD]  # +-0.8660
    assert group_normalized(returns=RETURNS).tolist() == pytest.approx(expected, abs=1e-5)


def test_dr_grpo_only_subtracts_the_mean():
    assert group_normalized(returns=RETURNS, scale_by_std=False).tolist() == [0.5, -0.5, -0.5, 0.5]


def test_rloo_subtracts_the_mean_of_the_others():
    # 1 - (0 + 0 + 1) / 3 = 2/3; 0 - (1 + 0 + 1) / 3 = -2/3
    assert leave_one_out(returns=RETURNS).tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3])
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_out(returns=torch.tensor([1.0]))


def test_a_group_whose_returns_all_agree_gets_no_signal():
    same = torch.tensor([3.0, 3.0, 3.0])
    assert group_normalized(returns=same).tolist() == [0.0, 0.0, 0.0]
    assert leave_one_out(returns=same).tolist() == [0.0, 0.0, 0.0]


def test_revision_turns_every_attempt_takes_its_episodes_advantage():
    """Two groups of two episodes, attempts interleaved as in-flight decoding finishes them. Group 0: member 0
    fails (-1) then succeeds after a revision (+5): return 4; member 1 succeeds at once: 5. Group 1: member 0
    fails three times: -3; member 1 fails, then succeeds: 4."""
    groups = [0, 0, 1, 1, 0, 1, 1, 1]
    members = [0, 1, 0, 1, 0, 0, 1, 0]
    rewards = [-1.0, 5.0, -1.0, -1.0, 5.0, -1.0, 5.0, -1.0]
    episode_of, returns, episode_groups = episode_returns(groups=groups, members=members, rewards=rewards)
    assert episode_of == [0, 1, 2, 3, 0, 2, 3, 2]
    assert returns.tolist() == [4.0, 5.0, -3.0, 4.0] and episode_groups.tolist() == [0, 0, 1, 1]

    # GRPO: group 0 is (4, 5): mean 4.5, sample std sqrt(0.5); group 1 is (-3, 4): mean 0.5, std sqrt(24.5).
    grpo = episode_advantages(returns=returns, groups=episode_groups, estimator="grpo")
    expected = [-0.5 / 0.5**0.5, 0.5 / 0.5**0.5, -3.5 / 24.5**0.5, 3.5 / 24.5**0.5]
    assert grpo.tolist() == pytest.approx(expected, abs=1e-5)
    # RLOO with two members: each return minus the other's.
    rloo = episode_advantages(returns=returns, groups=episode_groups, estimator="rloo")
    assert rloo.tolist() == [-1.0, 1.0, -7.0, 7.0]
    dr_grpo = episode_advantages(returns=returns, groups=episode_groups, estimator="grpo", scale_by_std=False)
    assert dr_grpo.tolist() == [-0.5, 0.5, -3.5, 3.5]

    per_attempt = attempt_advantages(episode_of=episode_of, advantages=rloo)
    # the failed first attempt of group 0's member 0 and its successful revision share the episode's -1
    assert per_attempt.tolist() == [-1.0, 1.0, -7.0, 7.0, -1.0, -7.0, 7.0, -7.0]


def test_reinforce_pp_leaves_normalisation_to_the_batch():
    returns = torch.tensor([4.0, 5.0, -3.0])
    raw = episode_advantages(returns=returns, groups=torch.tensor([0, 1, 2]), estimator="reinforce_pp")
    assert raw.tolist() == returns.tolist()


def _attempt(group: int, reward: float, logprobs: list[float], reference: list[float]) -> Attempt:
    return Attempt(
        prompt=None, answer_ids=torch.zeros(len(logprobs), dtype=torch.long), token_logprobs=torch.tensor(logprobs),
        token_weights=None, value=0.0, reward=reward, correct=reward > 0, terminated=True, truncated=False,
        env_index=0, attempt_index=0, progress=None, reference_token_logprobs=torch.tensor(reference), group=group,
        member=0,
    )


class OneRank:
    """What ``PPOModule._critic_free_advantages`` uses of the module, on a single rank (the reduce is the identity)."""

    device = torch.device("cpu")
    trainer = type("Trainer", (), {"strategy": type("Strategy", (), {"reduce": staticmethod(lambda t, reduce_op: t)})})

    def __init__(self, ppo: PPOConfig) -> None:
        self.ppo = ppo

    def _normalize_over_ranks(self, advantages):
        return PPOModule._normalize_over_ranks(self, advantages)


# Three episodes (groups 0, 1, 2). Episode A fails (-1) with log-ratio to the reference 0.5 (-1 - -1.5, -2 - -2),
# then succeeds (+5) with log-ratio -0.25 (-0.5 - -0.25); B succeeds at once (+5), log-ratio 1 + 2 = 3;
# C fails (-1) exactly as the reference would answer (log-ratio 0).
KL_BATCH = [
    _attempt(0, -1.0, [-1.0, -2.0], [-1.5, -2.0]), _attempt(1, 5.0, [-1.0, -1.0], [-2.0, -3.0]),
    _attempt(0, 5.0, [-0.5], [-0.25]), _attempt(2, -1.0, [-2.0], [-2.0]),
]


def test_reinforce_pp_subtracts_the_kl_from_the_reward_before_the_batch_normalisation():
    shaped = kl_penalised_rewards(
        rewards=torch.tensor([a.reward for a in KL_BATCH]), token_logprobs=[a.token_logprobs for a in KL_BATCH],
        reference_token_logprobs=[a.reference_token_logprobs for a in KL_BATCH], kl_coef=0.5,
    )
    # r - 0.5 x log-ratio: -1 - 0.25, 5 - 1.5, 5 + 0.125, -1 - 0
    assert shaped.tolist() == pytest.approx([-1.25, 3.5, 5.125, -1.0])

    advantages = PPOModule._critic_free_advantages(OneRank(PPOConfig(advantage="reinforce_pp", kl_coef=0.5)), KL_BATCH)
    # Returns: A = -1.25 + 5.125 = 3.875, B = 3.5, C = -1; mean 2.125, population std sqrt(14.71875 / 3).
    std = (14.71875 / 3) ** 0.5
    a, b, c = 1.75 / std, 1.375 / std, -3.125 / std
    assert advantages.tolist() == pytest.approx([a, b, a, c], abs=1e-6)  # both of A's attempts take A's advantage
    # Without the KL, B (5) beats A (4); charged for drifting from the reference, B falls behind A.
    plain = PPOModule._critic_free_advantages(OneRank(PPOConfig(advantage="reinforce_pp")), KL_BATCH)
    assert plain[1] > plain[0] and advantages[1] < advantages[0]
    # GRPO keeps the KL in the loss: its advantages do not see it (the same attempts as two groups of two).
    pairs = [dataclasses.replace(a, group=i // 2, member=i % 2) for i, a in enumerate(KL_BATCH)]
    grpo = PPOModule._critic_free_advantages(OneRank(PPOConfig(advantage="grpo", group_size=2, kl_coef=0.5)), pairs)
    no_kl = PPOModule._critic_free_advantages(OneRank(PPOConfig(advantage="grpo", group_size=2)), pairs)
    assert torch.equal(grpo, no_kl) and grpo.abs().sum() > 0


def test_reinforce_pp_kl_replaces_the_loss_term_and_is_still_reported():
    inputs = dict(
        logprob=torch.tensor([-1.0, -2.0]), old_logprob=torch.tensor([-1.0, -2.0]),
        advantages=torch.tensor([1.0, -1.0]), values=None, old_values=torch.zeros(2), returns=torch.zeros(2),
        entropy=torch.zeros(2), kl=torch.tensor([0.25, 0.75]),
    )
    in_reward, in_reward_stats = ppo_loss(**inputs, config=PPOConfig(advantage="reinforce_pp", kl_coef=0.5))
    in_loss, _ = ppo_loss(**inputs, config=PPOConfig(advantage="grpo", kl_coef=0.5))
    policy_loss = torch.tensor(0.0)  # ratios 1: the surrogate is -mean(advantages) = 0
    assert in_reward.item() == pytest.approx(policy_loss.item())
    assert in_loss.item() == pytest.approx(0.5 * 0.5)  # kl_coef x mean KL
    assert in_reward_stats["kl_to_reference"].item() == pytest.approx(0.5)
    assert PPOConfig(advantage="reinforce_pp", kl_coef=0.5).kl_in_reward
    assert not PPOConfig(advantage="reinforce_pp").kl_in_reward and not PPOConfig(kl_coef=0.5).kl_in_reward


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"advantage": "rloo", "group_size": 1}, "ppo.group_size: rloo compares episodes within a group"),
        ({"advantage": "grpo", "group_size": 1}, "ppo.group_size: grpo compares episodes within a group"),
        ({"advantage": "gae", "group_size": 4}, "ppo.group_size: applies to critic-free estimators only"),
        ({"advantage": "ppo"}, "ppo.advantage: must be one of gae, grpo, rloo, reinforce_pp"),
        ({"advantage": "grpo", "group_size": 0}, "ppo.group_size: must be a positive integer"),
    ],
)
def test_bad_estimator_settings_are_refused_in_one_line(kwargs, message):
    with pytest.raises(ValueError) as error:
        PPOConfig(**kwargs)
    assert str(error.value).startswith(message) and "\n" not in str(error.value), str(error.value)


def test_group_size_defaults_follow_the_estimator():
    assert PPOConfig(advantage="grpo").episodes_per_group == 4
    assert PPOConfig(advantage="rloo").episodes_per_group == 4
    assert PPOConfig(advantage="reinforce_pp").episodes_per_group == 1
    assert PPOConfig(advantage="grpo", group_size=8).episodes_per_group == 8
