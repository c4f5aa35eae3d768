"""Reward shaping without editing the environment: a gymnasium wrapper named in the YAML's task.wrappers."""

import gymnasium as gym


class FormatPenalty(gym.Wrapper):
    """Adds ``penalty`` to the reward of an answer the environment could not parse, and says so in
    ``info["reward_components"]`` (logged as train/reward/task and train/reward/format)."""

    def __init__(self, env, penalty: float = -0.5):
        super().__init__(env)
        self.penalty = penalty

    def step(self, action):
        observation, reward, terminated, truncated, info = self.env.step(action)
        shaping = 0.0 if info["well_formed"] else self.penalty
        info = {**info, "reward_components": {"task": float(reward), "format": shaping}}
        return observation, reward + shaping, terminated, truncated, info
