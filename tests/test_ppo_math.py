"""GAE and the PPO objective against values computed by hand."""

import math

import pytest
import torch

from lit_sftrl.ppo import PPOConfig, compute_gae, ppo_loss


def gae(rewards, values, next_values, ends):
    t = lambda xs: torch.tensor(xs, dtype=torch.float32)  # noqa: E731
    return compute_gae(t(rewards), t(values), t(next_values), torch.tensor(ends), gamma=0.9, lam=0.95)


def test_gae_terminal_episode():
    # rewards -1, -1, +5 (solved on the third attempt); V = 0.5, 0.2, 0.1; nothing after the terminal step.
    advantages, returns = gae([-1, -1, 5], [0.5, 0.2, 0.1], [0.2, 0.1, 0.0], [False, False, True])
    assert advantages.tolist() == pytest.approx([1.3129725, 3.0795, 4.9], abs=1e-5)
    assert returns.tolist() == pytest.approx([1.8129725, 3.2795, 5.0], abs=1e-5)


def test_gae_truncation_bootstraps_from_the_truncated_state():
    # Budget used up after two failures; V(truncated state) = 0.3 is the bootstrap, not the next episode.
    advantages, _ = gae([-1, -1], [0.5, 0.2], [0.2, 0.3], [False, True])
    assert advantages.tolist() == pytest.approx([-2.11515, -0.93], abs=1e-5)


def test_gae_does_not_flow_across_episodes():
    # Episode 1 solved at once (V=1); episode 2 then starts in the same environment and is cut (bootstrap 0.2).
    advantages, _ = gae([5, -1], [1.0, 0.4], [0.0, 0.2], [True, True])
    assert advantages.tolist() == pytest.approx([4.0, -1.22], abs=1e-5)


def test_ppo_loss_by_hand():
    config = PPOConfig(clip_eps=0.1, value_clip=0.1, value_coef=0.5, entropy_coef=0.0, kl_coef=0.0)
    loss, stats = ppo_loss(
        logprob=torch.tensor([-1.0, -2.0]), old_logprob=torch.tensor([-1.1, -1.5]), advantages=torch.tensor([1.0, -1.0]),
        values=torch.tensor([0.5, 0.0]), old_values=torch.tensor([0.3, 0.2]), returns=torch.tensor([1.0, -0.5]),
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
        old_values=torch.zeros(2), returns=torch.zeros(2), entropy=torch.tensor([1.0, 3.0]), kl=torch.tensor([0.5, 1.5]),
    )
    loss, _ = ppo_loss(**base, config=PPOConfig(entropy_coef=0.1, kl_coef=0.2))
    assert loss.item() == pytest.approx(-0.1 * 2.0 + 0.2 * 1.0)
