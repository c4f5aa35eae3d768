"""The critic-free estimators against values computed by hand, on a fixed group, with and without revision turns.

GAE against hand-computed values is in ``test_ppo_math.py``.
"""

import pytest
import torch

from lit_sftrl.training.advantages import (
    attempt_advantages,
    episode_advantages,
    episode_returns,
    group_normalized,
    leave_one_out,
)
from lit_sftrl.training.ppo import PPOConfig

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
