"""GAE and the PPO objective against values computed by hand."""

import math

import pytest
import torch

from lit_sftrl.training.ppo import PPOConfig, PPOModule, answer_logprob, compute_gae, ppo_loss
from lit_sftrl.training.rollout import Attempt


def gae(rewards, values, next_values, ends):
    t = lambda xs: torch.tensor(xs, dtype=torch.float32)  # noqa: E731
    return compute_gae(
        rewards=t(rewards), values=t(values), next_values=t(next_values), episode_ends=torch.tensor(ends),
        gamma=0.9, lam=0.95,
    )


def test_gae_terminal_episode():
    # rewards -1, -1, +5 (solved on the third attempt); V = 0.5, 0.2, 0.1; nothing after the terminal step.
    advantages, returns = gae([-1, -1, 5], [0.5, 0.2, 0.1], [0.2, 0.1, 0.0], [False, False, True])
    assert advantages.tolist() == pytest.approx([1.3129725, 3.0795, 4.9], abs=1e-5)
    assert returns.tolist() == pytest.approx([1.8129725, 3.2795, 5.0], abs=1e-5)


def test_gae_cut_bootstraps_from_the_cut_state():
    # The rollout ended after two failures; V(cut state) = 0.3 is the bootstrap, not the next episode.
    advantages, _ = gae([-1, -1], [0.5, 0.2], [0.2, 0.3], [False, True])
    assert advantages.tolist() == pytest.approx([-2.11515, -0.93], abs=1e-5)


def test_gae_does_not_flow_across_episodes():
    # Episode 1 solved at once (V=1); episode 2 then starts in the same environment and is cut (bootstrap 0.2).
    advantages, _ = gae([5, -1], [1.0, 0.4], [0.0, 0.2], [True, True])
    assert advantages.tolist() == pytest.approx([4.0, -1.22], abs=1e-5)


def test_ppo_loss_by_hand():
    config = PPOConfig(clip_eps=0.1, value_clip=0.1, value_coef=0.5, entropy_coef=0.0, kl_coef=0.0)
    loss, stats = ppo_loss(
        logprob=torch.tensor([-1.0, -2.0]), old_logprob=torch.tensor([-1.1, -1.5]),
        advantages=torch.tensor([1.0, -1.0]), returns=torch.tensor([1.0, -0.5]),
        values=torch.tensor([0.5, 0.0]), old_values=torch.tensor([0.3, 0.2]),
        entropy=torch.tensor([0.7, 0.9]), kl=torch.zeros(2), config=config,
    )
    # ratio e^0.1 clipped to 1.1 for the positive advantage; e^-0.5 clipped to 0.9 for the negative one.
    assert stats["policy_loss"].item() == pytest.approx((-1.1 + 0.9) / 2, abs=1e-6)
    # Clipped values 0.4 and 0.1 give the larger errors 0.36 and 0.36.
    assert stats["value_loss"].item() == pytest.approx(0.18, abs=1e-6)
    assert loss.item() == pytest.approx(-0.1 + 0.5 * 0.18, abs=1e-6)
    assert stats["clip_fraction"].item() == 1.0
    ratio = torch.tensor([math.exp(0.1), math.exp(-0.5)])
    assert stats["approx_kl"].item() == pytest.approx(((ratio - 1) - ratio.log()).mean().item(), abs=1e-6)


def test_entropy_bonus_and_kl_penalty_enter_the_loss():
    base = dict(
        logprob=torch.zeros(2), old_logprob=torch.zeros(2), advantages=torch.zeros(2), values=torch.zeros(2),
        old_values=torch.zeros(2), returns=torch.zeros(2), entropy=torch.tensor([1.0, 3.0]),
        kl=torch.tensor([0.5, 1.5]),
    )
    loss, _ = ppo_loss(**base, config=PPOConfig(entropy_coef=0.1, kl_coef=0.2))
    assert loss.item() == pytest.approx(-0.1 * 2.0 + 0.2 * 1.0)


def attempt(env_index, reward, value, terminated=False, truncated=False, bootstrap=0.0):
    return Attempt(
        prompt=([], None), answer_ids=torch.zeros(1), token_logprobs=torch.zeros(1), token_weights=None, value=value,
        reward=reward, correct=False, terminated=terminated, truncated=truncated, env_index=env_index,
        attempt_index=1, progress=None, bootstrap_value=bootstrap,
    )


def test_a_budget_exhausting_attempt_is_terminal_in_the_advantages():
    """Environment 0 uses up its budget (-1 verdict, -1 penalty: -2, terminal): nothing is bootstrapped after it,
    even though a value for the following state exists. Environment 1 is cut by the rollout's end: bootstrapped."""
    module = PPOModule(ppo=PPOConfig(normalize_advantages=False))
    attempts = [
        attempt(0, -1.0, 0.5), attempt(1, -1.0, 0.4), attempt(0, -2.0, 0.2, terminated=True, bootstrap=7.0),
        attempt(1, -1.0, 0.3, truncated=True, bootstrap=0.6),
    ]
    advantages, returns = module._advantages(attempts)
    assert advantages[2].item() == pytest.approx(-2.0 - 0.2)  # r - V, no gamma * V(next)
    assert advantages[0].item() == pytest.approx(-1.0 + 0.9 * 0.2 - 0.5 + 0.9 * 0.95 * (-2.2), abs=1e-6)
    assert advantages[3].item() == pytest.approx(-1.0 + 0.9 * 0.6 - 0.3, abs=1e-6)
    assert returns.tolist() == pytest.approx((advantages + torch.tensor([0.5, 0.4, 0.2, 0.3])).tolist())


def test_value_loss_without_clipping_is_the_plain_squared_error():
    base = dict(
        logprob=torch.zeros(2), old_logprob=torch.zeros(2), advantages=torch.zeros(2), values=torch.tensor([0.0, 1.0]),
        old_values=torch.zeros(2), returns=torch.tensor([-10.0, 1.0]), entropy=torch.zeros(2), kl=torch.zeros(2),
    )
    _, stats = ppo_loss(**base, config=PPOConfig(value_clip=0.0))
    assert stats["value_loss"].item() == pytest.approx(0.5 * (100 + 0) / 2)
    _, clipped = ppo_loss(**base, config=PPOConfig(value_clip=0.1))
    assert clipped["value_loss"].item() == pytest.approx(0.5 * (100 + 0.81) / 2)  # max(error, clipped error)


def test_thought_coef_weights_the_reasoning_tokens():
    token_logprobs = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    assert answer_logprob(token_logprobs, None).item() == -10.0
    assert answer_logprob(token_logprobs, torch.tensor([0.5, 0.5, 1.0, 1.0])).item() == -8.5


@pytest.mark.parametrize("name, value", [("ppo_epochs", 0), ("minibatch_size", -1), ("gamma", 1.5),
                                         ("clip_eps", float("inf")), ("value_clip", -0.1), ("thought_coef", 2.0)])
def test_ppo_config_rejects_bad_values_naming_the_key(name, value):
    with pytest.raises(ValueError, match=f"ppo.{name}"):
        PPOConfig(**{name: value})
