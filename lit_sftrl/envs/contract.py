"""What an environment must give lit-sftrl, and a checker for it (as gymnasium's env checker, run when a run starts).

The trainer talks to an environment only through gymnasium's ``reset`` and ``step``, the ``info`` dict of each
step, and, for SFT from expert play, ``expert_answer()``:

* **Observation**: a dict ``{"messages": [{"role": "user" | "assistant" | "system", "content": str}, ...]}``, the
  chat the model answers next, ending with a user turn; plus ``"image"``, an ``(H, W, 3)`` uint8 array, for an
  image task (it belongs to the first user turn).
* **Action**: the model's answer, a ``str``.
* **Reward**: a finite number per answer. ``terminated``/``truncated``: bools, as gymnasium defines them.
* **info** of every step (:data:`INFO_KEYS`): ``success``, ``correct`` and ``well_formed`` are required (success
  rate, per-step accuracy, well-formedness are read from them); the others are optional.
* **Revision turn**: after a wrong answer with attempts left, the next observation continues the conversation:
  the previous messages, the answer as an assistant turn, then a user turn saying why it failed. An observation
  that does not start with the previous messages starts a new conversation (V-IRL's next rail point).
* ``expert_answer()``: a correct answer for the current state (a ``str``), needed for SFT from expert play;
  ``suboptimal_answer()`` (a wrong but well-formed answer) only for ``multi_turn`` SFT.

:func:`check_env` resets the environment, answers once deliberately wrong and, where the environment has one,
once with its expert answer, and raises :class:`ContractError` with one line naming the environment, the key and
what was expected. Nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

WRONG_ANSWER = "this is not an answer"  # what the checker answers first: no environment should judge it correct
ROLES = ("system", "user", "assistant")


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not _is_bool(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not _is_bool(value) and math.isfinite(value)


def _is_components(value: Any) -> bool:
    return isinstance(value, Mapping) and all(isinstance(k, str) and _is_number(v) for k, v in value.items())


# info key -> (required, type test, what is expected, what reads it)
INFO_KEYS: dict[str, tuple[bool, Any, str, str]] = {
    "success": (True, _is_bool, "a bool", "whether the episode is solved so far; read for the success rate"),
    "correct": (True, _is_bool, "a bool", "whether this answer was right; read for per-step accuracy"),
    "well_formed": (True, _is_bool, "a bool",
                    "whether the answer parsed as the answer format; read for well-formedness"),
    "recognized": (False, lambda v: v is None or _is_bool(v), "a bool or None",
                   "whether the image was read right on the first attempt; read for recognition, None: not judged"),
    "budget_exhausted": (False, _is_bool, "a bool",
                         "this answer used up an attempt budget; per_step_accuracy_paper counts one more wrong step"),
    "feedback": (False, lambda v: v is None or isinstance(v, str), "a str or None",
                 "why the answer failed; kept in transcripts"),
    "action_offset": (False, lambda v: v is None or _is_int(v), "an int or None",
                      "where the answer's action field starts; PPO's thought_coef weighs the text before it"),
    "attempt": (False, _is_int, "an int", "the attempt's number; logged as train/max_attempt_index"),
    "rail_index": (False, lambda v: v is None or _is_int(v), "an int or None",
                   "how far the episode got; logged as train/max_rail_index"),
    "reward_components": (False, _is_components, "a dict of name -> finite number",
                          "what the reward is made of; each logged as train/reward/<name>"),
}


class ContractError(ValueError):
    """An environment does not give what the trainer reads: one line, naming the environment and the key."""


def check_env(env: Any, name: str, *, expert: bool = False, suboptimal: bool = False, seed: int = 0) -> None:
    """Check ``env`` against the contract; raise :class:`ContractError` at the first break.

    ``name`` names the environment in the message (e.g. its import path and variant). ``expert``: SFT plays the
    expert, so ``expert_answer()`` is required (otherwise checked only where present); ``suboptimal``: so is
    ``suboptimal_answer()``.
    """

    def fail(what: str) -> None:
        raise ContractError(" ".join(f"{name}: {what}".split()))  # one line, whatever the user's error said

    for method in ("reset", "step"):
        if not callable(getattr(env, method, None)):
            fail(f"has no {method}() method; expected a gymnasium.Env (got a {type(env).__name__})")
    reset = _call(fail, "reset(seed=...)", env.reset, seed=seed)
    if not isinstance(reset, tuple) or len(reset) != 2:
        fail(f"reset() returned {_short(reset)}; expected the pair (observation, info)")
    observation, info = reset
    _check_observation(fail, "reset()", observation)
    if not isinstance(info, Mapping):
        fail(f"reset() info is a {type(info).__name__}; expected a dict")
    _check_step(fail, env, observation, WRONG_ANSWER, wrong=True)

    unwrapped = getattr(env, "unwrapped", env)
    for method, required in (("expert_answer", expert), ("suboptimal_answer", suboptimal)):
        if not callable(getattr(unwrapped, method, None)):
            if required:
                fail(f"has no {method}() method; expected one returning a str "
                     f"({'SFT from expert play' if method == 'expert_answer' else 'multi_turn SFT'} needs it)")
            continue
        observation, _ = _call(fail, "reset(seed=...)", env.reset, seed=seed)
        try:
            answer = getattr(unwrapped, method)()
        except NotImplementedError:  # ChatEnv's placeholder: the environment has no expert
            if required:
                fail(f"{method}() is not implemented; expected one returning a str")
            continue
        except Exception as error:  # noqa: BLE001 - the user's code: any failure is reported in one line
            fail(f"{method}() raised {type(error).__name__}: {error}")
        if not isinstance(answer, str):
            fail(f"{method}() returned a {type(answer).__name__}; expected a str")
        info = _check_step(fail, env, observation, answer, wrong=False)
        if method == "expert_answer" and not info["correct"]:
            fail(f"step(expert_answer()) info['correct'] is False for {answer!r}; expected True (the expert's "
                 "answer must be right)")


def _check_step(fail: Any, env: Any, observation: Any, answer: str, wrong: bool) -> Mapping:
    step = _call(fail, f"step({answer!r})", env.step, answer)
    if not isinstance(step, tuple) or len(step) != 5:
        fail(f"step() returned {_short(step)}; expected (observation, reward, terminated, truncated, info)")
    next_observation, reward, terminated, truncated, info = step
    if not _is_number(reward):
        fail(f"step() reward is {reward!r}; expected a finite number")
    for key, value in (("terminated", terminated), ("truncated", truncated)):
        if not _is_bool(value):
            fail(f"step() {key} is {value!r}; expected a bool")
    if not isinstance(info, Mapping):
        fail(f"step() info is a {type(info).__name__}; expected a dict")
    for key, (required, test, expected, meaning) in INFO_KEYS.items():
        if key not in info:
            if required:
                fail(f"step() info has no {key!r}; expected {expected} ({meaning})")
        elif not test(info[key]):
            fail(f"step() info[{key!r}] is {_short(info[key])}; expected {expected} ({meaning})")
    if wrong and info["correct"]:
        fail(f"step({answer!r}) info['correct'] is True for a deliberately wrong answer; expected False")
    _check_observation(fail, "step()", next_observation)
    if not (terminated or truncated):
        _check_continuation(fail, observation["messages"], next_observation["messages"], answer)
    return info


def _check_observation(fail: Any, where: str, observation: Any) -> None:
    if not isinstance(observation, Mapping) or "messages" not in observation:
        fail(f"{where} observation is {_short(observation)}; expected a dict with 'messages' (and 'image' for an "
             "image task)")
    messages = observation["messages"]
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        fail(f"{where} observation['messages'] is {_short(messages)}; expected a non-empty list of "
             "{'role', 'content'} dicts")
    for index, message in enumerate(messages):
        if (not isinstance(message, Mapping) or message.get("role") not in ROLES
                or not isinstance(message.get("content"), str)):
            fail(f"{where} observation['messages'][{index}] is {_short(message)}; expected "
                 f"{{'role': one of {', '.join(ROLES)}, 'content': str}}")
    if messages[-1]["role"] != "user":
        fail(f"{where} observation['messages'] ends with a {messages[-1]['role']!r} turn; expected a 'user' turn "
             "(the model answers it)")
    image = observation.get("image")
    if image is not None and not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
                                  and image.shape[2] == 3):
        fail(f"{where} observation['image'] is {_short(image)}; expected an (H, W, 3) uint8 numpy array")


def _check_continuation(fail: Any, before: Sequence, after: Sequence, answer: str) -> None:
    """A revision turn continues the conversation: the previous messages, the answer, then a user turn."""
    if len(after) <= len(before) or [dict(m) for m in after[: len(before)]] != [dict(m) for m in before]:
        return  # a new conversation (the next rail point, say)
    turn = dict(after[len(before)])
    if turn != {"role": "assistant", "content": answer}:
        fail(f"step() observation continues the conversation with {_short(turn)} after the previous messages; "
             f"expected the answer as it was given, {{'role': 'assistant', 'content': {answer!r}}}, then a user turn")


def _call(fail: Any, what: str, function: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return function(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - the user's code: any failure is reported in one line
        fail(f"{what} raised {type(error).__name__}: {error}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
