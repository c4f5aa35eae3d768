"""Environments and a reward wrapper defined outside the package, as a user's own code is: the tests name them by
import path in YAML (``tests.own_env_fixture:AddEnv``) and the trainer imports them from the current directory."""

from __future__ import annotations

import gymnasium as gym


class AddEnv(gym.Env):
    """Add two numbers of ``digits`` digits; ``attempts`` tries, each wrong one answered with feedback."""

    def __init__(self, digits: int = 1, attempts: int = 2) -> None:
        self.digits, self.attempts = digits, attempts

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        low, high = 10 ** (self.digits - 1) if self.digits > 1 else 0, 10**self.digits
        self.a, self.b = (int(x) for x in self.np_random.integers(low, high, 2))
        self.tries = 0
        self.messages = [{"role": "user", "content": f"What is {self.a} + {self.b}? Reply with the number only."}]
        return self._observation(), {}

    def step(self, answer):
        self.tries += 1
        text = answer.strip()
        correct = text == str(self.a + self.b)
        done = correct or self.tries >= self.attempts
        if not done:
            self.messages += [{"role": "assistant", "content": answer},
                              {"role": "user", "content": f"{text!r} is not the sum. Try again."}]
        info = {"success": correct, "correct": correct, "well_formed": text.isdigit(), "attempt": self.tries,
                "budget_exhausted": done and not correct}
        return self._observation(), float(correct), done, False, info

    def expert_answer(self) -> str:
        return str(self.a + self.b)

    def _observation(self) -> dict:
        return {"messages": [dict(m) for m in self.messages]}


class NoWellFormed(AddEnv):
    """Breaks the contract: its info lacks ``well_formed``."""

    def step(self, answer):
        observation, reward, terminated, truncated, info = super().step(answer)
        del info["well_formed"]
        return observation, reward, terminated, truncated, info


class TextReward(AddEnv):
    """Breaks the contract: its reward is text."""

    def step(self, answer):
        observation, reward, terminated, truncated, info = super().step(answer)
        return observation, str(reward), terminated, truncated, info


class NoExpert(AddEnv):
    expert_answer = None


class LengthBonusAdd(AddEnv):
    """AddEnv whose reward also counts the answer's length modulo 3: the samples of an untrained tiny model, which
    never add up, still earn rewards that differ (what tests of advantage normalisation need)."""

    def step(self, answer):
        observation, reward, terminated, truncated, info = super().step(answer)
        return observation, reward + len(answer) % 3, terminated, truncated, info
