"""What the datamodules hand the LightningModules: which episodes to play. A leaf module (no torch, no models).

An episode is named by ``(reset seed, reset options)``: an environment reset with them always starts the same
episode, which is what makes evaluation identical for every checkpoint and a resumed run exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Episode = tuple[int, dict[str, Any]]  # (reset seed, reset options)
Wrapping = tuple[tuple[str, dict[str, Any]], ...]  # wrappers around the environment: (import path, kwargs) each


@dataclass
class EvalEpisodes:
    """A chunk of fixed evaluation episodes of one variant, played together by the policy module."""

    task: str
    variant: str
    env_id: str
    env_kwargs: dict[str, Any]
    episodes: list[Episode]
    wrappers: Wrapping = ()


@dataclass
class RolloutSpec:
    """What a rank plays for PPO: ``num_envs`` environments, ``rollout_steps`` attempts per update. Episodes are
    seeded from (seed, rank, environment, episode number) and carry over from one update to the next."""

    env_id: str
    env_kwargs: dict[str, Any]
    num_envs: int
    rollout_steps: int
    seed: int
    rank: int
    wrappers: Wrapping = ()
