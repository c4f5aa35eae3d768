"""What every lit-sftrl environment shares: an episode is a conversation with the model.

The environment states the task in a user turn; the model answers (the action is that text); after a failed
attempt with budget left, the conversation continues with the answer and a user turn that says why it
failed (the paper's sequential revision). Observations are plain dicts so that any model can consume them:

    {"messages": ({"role": "user" | "assistant", "content": str}, ...),   # the next call's chat (a tuple)
     "image": np.ndarray (H, W, 3) uint8}        # image modality only; belongs to the first user turn

Environments know nothing of models: turning messages and image into tokens is the backbone's job.
"""

from __future__ import annotations

import math
import reprlib
import string
from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from lit_sftrl.envs.parsing import MAX_ANSWER_CHARS

REVISION_PREFIX = "You failed this trial because "
# How a non-text answer (a caller's bug) appears in the conversation: a bounded repr that survives any object,
# deeply nested containers included (a plain repr raises RecursionError on them).
_ANSWER_REPR = reprlib.Repr()
_ANSWER_REPR.maxstring = _ANSWER_REPR.maxother = 200


def check_choice(name: str, value: Any, allowed: tuple) -> None:
    """Reject a constructor argument outside ``allowed`` with a message naming both."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not valid; allowed values: {', '.join(map(repr, allowed))}")


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is not valid; it must be a positive integer")


def answer_text(answer: object) -> str:
    """The answer as conversation text: itself when it is text, else a bounded repr (never raises)."""
    return answer if isinstance(answer, str) else _ANSWER_REPR.repr(answer)


def reward_table(defaults: Mapping[str, float], rewards: Mapping[str, float] | None) -> dict[str, float]:
    """``defaults`` overridden by ``rewards`` (a configurable reward table); unknown keys and non-finite values
    are rejected with a message naming them."""
    table = dict(defaults)
    allowed = ", ".join(map(repr, defaults))
    if rewards is None:
        return table
    if not isinstance(rewards, Mapping):
        raise ValueError(f"rewards={rewards!r} is not valid; it must be a dict with keys among {allowed}")
    for key, value in rewards.items():
        if key not in defaults:
            raise ValueError(f"rewards key {key!r} is not valid; allowed keys: {allowed}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"rewards[{key!r}]={value!r} is not valid; it must be a finite number")
        table[key] = float(value)
    return table


class ChatEnv(gym.Env):
    """Base class: holds the conversation and builds observations; subclasses decide rewards."""

    metadata = {"render_modes": []}
    # The revision turn's wording (a template with the field {feedback}; subclasses take it from their table).
    revision_template = REVISION_PREFIX + "{feedback}"
    action_space = spaces.Text(max_length=MAX_ANSWER_CHARS, charset=string.printable)

    def __init__(self, image_size: int | None = None) -> None:
        super().__init__()
        self._messages: list[dict[str, str]] = []
        self._image: np.ndarray | None = None
        # Observations are chat transcripts, not tensors; the space documents the image part only.
        self.observation_space = spaces.Dict(
            {
                "messages": spaces.Sequence(
                    spaces.Dict({"role": spaces.Text(16), "content": spaces.Text(1 << 16, charset=string.printable)})
                ),
                **(
                    {"image": spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)}
                    if image_size is not None
                    else {}
                ),
            }
        )

    def _start_conversation(self, prompt: str, image: np.ndarray | None = None) -> None:
        self._messages = [{"role": "user", "content": prompt}]
        self._image = image

    def _revise(self, answer: object, feedback: str) -> None:
        """Continue the conversation after a failed attempt: the answer, then why it failed."""
        self._messages.append({"role": "assistant", "content": answer_text(answer)})
        self._messages.append({"role": "user", "content": self.revision_template.format_map({"feedback": feedback})})

    def _observation(self) -> dict[str, Any]:
        # Fresh data on every call (gymnasium's contract): callers may keep or modify what they get.
        observation: dict[str, Any] = {"messages": tuple(dict(message) for message in self._messages)}
        if self._image is not None:
            observation["image"] = self._image.copy()
        return observation

    def expert_answer(self) -> str:
        """The optimal answer text for the current state (what SFT trains on; always earns the top reward)."""
        raise NotImplementedError
