"""Text-in, text+image-out environments (gymnasium API). Nothing here imports torch."""

from __future__ import annotations

import gymnasium as gym

GENERAL_POINTS_ID = "lit_sftrl/GeneralPoints-v0"
VIRL_ID = "lit_sftrl/VIRL-v0"


def register_envs() -> None:
    """Register both environments with gymnasium (idempotent)."""
    registry = gym.envs.registration.registry
    if GENERAL_POINTS_ID not in registry:
        gym.register(GENERAL_POINTS_ID, entry_point="lit_sftrl.envs.general_points:GeneralPointsEnv")
    if VIRL_ID not in registry:
        gym.register(VIRL_ID, entry_point="lit_sftrl.envs.virl:VIRLEnv")
