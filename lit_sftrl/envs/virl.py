"""V-IRL navigation (docs/spec.md §2): follow route instructions through street views, one rail point at a time.

An episode is one route. The agent only ever stands on the route's *rail* (the expert trajectory, built as the
original code built it: see ``lit_sftrl.envs.rail``). At each rail point the model answers a JSON object; a
right action moves it to the next point with a fresh prompt, a wrong one earns a revision turn until
``verify_iter`` attempts at that point are used up.

Decisions the spec leaves open (documented once, here):

* **Reward order.** Right action (case/space-normalised) -> ``correct``; else a wrong claim about being at an
  intersection -> ``wrong_observation``; else ``wrong_action``. An answer without a readable JSON object or
  without an ``action`` key -> ``malformed`` (default -1, the same as a wrong action, so format errors are
  not cheaper than wrong moves) with feedback saying why. The ``current instruction`` is not graded.
* **Intersection claim.** Read from the answer's ``current observation``: it claims an intersection when the
  text mentions "intersection" without a negation just before it ("no intersection", "not at an
  intersection"). A missing observation claims none. The claim is compared with the true flag of the point.
* **Budget exhaustion** ends the episode with ``terminated=True`` (the paper's MDP: the route has failed; the
  prompt shows the attempts so far, so the budget's end is part of the state, and nothing is bootstrapped
  after it). That attempt's reward is its verdict plus the ``budget_exhausted`` penalty (default -1).
* **Per-step accuracy**, both counts, from the step infos: ours is correct attempts / attempts; the paper's
  counts the call that exceeds a rail point's budget in the original code as one more wrong step, i.e.
  correct / (attempts + number of steps with ``info["budget_exhausted"]``), C / (A + 1) on a failed route.
* **Missing panoramas.** A forward() point with no panorama within 20 m is left off the rail (as the original
  does), with a :class:`MissingPanoramaWarning` and a count (``info["skipped_rail_points"]`` at reset,
  ``skipped_rail_points`` on the env over its life). The check runs whenever the folder has a panorama
  mapping, in both modalities, so text and image tasks walk one rail. A start, intersection or destination
  with no panorama is an error in the image modality (skipping it would drop a turn from the task).
* ``info`` of every step: ``success``, ``correct``, ``recognized`` (None: V-IRL has no recognition check),
  ``well_formed`` (the answer is a JSON object with an ``action`` key), ``budget_exhausted``, ``outcome``,
  ``feedback``, ``gt_action``/``at_intersection``/``rail_index`` of the judged point, ``attempt`` (attempts at
  that point, 1..verify_iter; 0 after reset), ``route_index``, ``rail_length``, and ``action_offset`` (where the
  answer's ``action`` field begins, or None; for PPO's ``thought_coef``).
* ``route_order="sequential"`` walks routes in file order, one per reset, independent of the seed, wrapping
  after ``num_routes``; ``reset(options={"route_index": i})`` forces a route and does not advance that walk.
* Wording: every prompt and feedback text is a template (``lit_sftrl.envs.templates``); ``templates``
  replaces any of ``DEFAULT_TEMPLATES`` (fields in ``TEMPLATE_FIELDS``).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from lit_sftrl.envs.base import ChatEnv, check_choice, check_positive_int, reward_table
from lit_sftrl.envs.images import MAX_IMAGE_PIXELS
from lit_sftrl.envs.parsing import extract_json_object, field_offset
from lit_sftrl.envs.rail import (  # noqa: F401  (re-exported: the rail's names were this module's)
    FORWARD,
    INTERSECTION_TEXT,
    STOP,
    RailPoint,
    build_rail,
    move_sentence,
    relative_word,
    route_sentences,
    turn_sentence,
)
from lit_sftrl.envs.routes import COMPASS, MAX_MILESTONES, SNAP_RADIUS_M, load_route_folder
from lit_sftrl.envs.templates import fill, template_table

ACTION_SPACES = ("absolute", "relative")
MODALITIES = ("text", "image")
ROUTE_ORDERS = ("random", "sequential")
RELATIVE_WORDS = ("left", "right", "slightly left", "slightly right")
DEFAULT_REWARDS = {"correct": 1.0, "wrong_observation": -1.5, "wrong_action": -1.0, "malformed": -1.0,
                   "budget_exhausted": -1.0}  # added to the verdict of the attempt that uses up a point's budget
VIEW_ORDER = ("front", "right", "back", "left")  # grid: top-left, top-right, bottom-left, bottom-right
MAX_QUOTED_CHARS = 80  # feedback quotes at most this much of a wrong action

# ---------------------------------------------------------------------------------- all wording lives here
VIEWS_TEXT = "You observe an image of 4 views"
_SECTIONS = "{task}\n\n[Instruction]\n{instructions}\n\n"
_REST = "{action_space}\n\n[Observations and actions]\n{history}\n\n{answer_format}"
DEFAULT_TEMPLATES: Mapping[str, str] = MappingProxyType({
    "prompt_text": _SECTIONS + _REST,
    "prompt_image": _SECTIONS + "{observation_format}\n\n" + _REST,
    "task": (
        "[Task]\nYou are an expert in navigation. Follow the numbered instructions below. You are given your "
        "observations and actions so far. First identify the instruction sentence to execute now, then choose the "
        "action to take at your current observation."
    ),
    "observation_format": (
        "[Observation format]\nThe image is a 2x2 grid of street views around you: top left = {} view, top right = "
        "{} view, bottom left = {} view, bottom right = {} view. Check whether landmarks from the instruction are "
        "visible in it."
    ).format(*VIEW_ORDER),
    "action_space": (
        '[Action space]\n"forward()": move forward one step\n"turn_direction(x)": turn towards direction x, where x '
        'is one of {choices}\n"stop()": the navigation is finished'
    ),
    "answer_format": (
        "[Output]\nAnswer with only a JSON object:\n"
        '{{"current observation": "your latest observation", '
        '"current instruction": "the instruction sentence to execute now", '
        '"action": "the action to take, from the action space"}}'
    ),
    "revision": "You failed this trial because {feedback}",
    "feedback_malformed": (
        'your answer could not be read ({reason}). Answer with a JSON object with the keys "current observation", '
        '"current instruction" and "action".'
    ),
    "feedback_not_an_action": "{action} is not an action of the action space.",
    "feedback_wrong_action": "{action} is not the right action here.",
    "feedback_claimed_intersection": "you are not at an intersection, but your observation says you are.",
    "feedback_missed_intersection": "you are at an intersection, but your observation does not say so.",
})
# ``instruction``, ``obs_act_seq`` are the original prompt library's names, so its prompts paste in.
_PROMPT_FIELDS = frozenset({"task", "instructions", "instruction", "action_space", "history", "obs_act_seq",
                            "answer_format", "observation_format"})
TEMPLATE_FIELDS: Mapping[str, frozenset[str]] = MappingProxyType({
    **{key: frozenset() for key in DEFAULT_TEMPLATES},
    "prompt_text": _PROMPT_FIELDS, "prompt_image": _PROMPT_FIELDS,
    "action_space": frozenset({"choices"}), "revision": frozenset({"feedback"}),
    "feedback_malformed": frozenset({"reason"}),
    "feedback_not_an_action": frozenset({"action"}), "feedback_wrong_action": frozenset({"action"}),
})


class MissingPanoramaWarning(UserWarning):
    """Rail points were left off a route because no panorama lies within 20 m of them."""


# ------------------------------------------------------------------------------------------ judge


_NEGATED = re.compile(r"\b(?:no|not|without|never)\s+(?:\w+\s+){0,3}?intersection")


def claims_intersection(observation: object) -> bool:
    """Does a stated observation say the agent is at an intersection? (see the module docstring)"""
    text = "" if observation is None else str(observation).lower()
    return "intersection" in text and _NEGATED.search(text) is None


def normalize_action(action: object) -> str:
    """Case, quotes and spacing do not matter: ``Turn_Direction( 'North' )`` == ``turn_direction(north)``."""
    text = re.sub(r"[\"'`]", "", str(action)).strip().lower().rstrip(".")
    text = re.sub(r"\s+", " ", text)
    return re.sub(r"\s*([()_])\s*", r"\1", text)


@dataclass(frozen=True)
class Verdict:
    outcome: str  # a key of DEFAULT_REWARDS
    feedback: str | None

    @property
    def correct(self) -> bool:
        return self.feedback is None

    @property
    def well_formed(self) -> bool:
        return self.outcome != "malformed"


def judge(answer: object, point: RailPoint, expert: str, valid: frozenset[str],
          text: Mapping[str, str] = DEFAULT_TEMPLATES) -> Verdict:
    """Grade one answer at one rail point (see the module docstring for the order of checks)."""
    parsed, reason = extract_json_object(answer)
    if parsed is None or "action" not in parsed:
        return Verdict("malformed", fill(text["feedback_malformed"], reason=reason or 'it has no "action" key'))
    action = normalize_action(parsed["action"])
    if action == normalize_action(expert):
        return Verdict("correct", None)
    claimed = claims_intersection(parsed.get("current observation"))
    if claimed != point.at_intersection:
        key = "feedback_claimed_intersection" if claimed else "feedback_missed_intersection"
        return Verdict("wrong_observation", fill(text[key]))
    key = "feedback_wrong_action" if action in valid else "feedback_not_an_action"
    return Verdict("wrong_action", fill(text[key], action=repr(str(parsed["action"])[:MAX_QUOTED_CHARS])))


# ------------------------------------------------------------------------------------------ the env


def check_rail(straight_line_length: object, drop_rate: object) -> None:
    """Interpolated points per segment: an integer >= 0; drop probability: a number in [0, 1]."""
    if isinstance(straight_line_length, bool) or not isinstance(straight_line_length, int) or straight_line_length < 0:
        raise ValueError(f"straight_line_length={straight_line_length!r} is not valid; it must be an integer >= 0")
    if isinstance(drop_rate, bool) or not isinstance(drop_rate, (int, float)) or not 0.0 <= drop_rate <= 1.0:
        raise ValueError(f"drop_rate={drop_rate!r} is not valid; it must be a number in [0, 1]")


class VIRLEnv(ChatEnv):
    """Gymnasium env ``lit_sftrl/VIRL-v0``: text (V-IRL-L) or text + 2x2 street-view grid (V-IRL-VL)."""

    def __init__(
        self,
        routes: str,
        action_space: str = "absolute",
        modality: str = "text",
        verify_iter: int = 2,
        straight_line_length: int = 5,
        drop_rate: float = 0.5,
        image_size: int = 224,
        route_order: str = "random",
        rewards: dict[str, float] | None = None,
        templates: Mapping[str, str] | None = None,
        max_milestones: int = MAX_MILESTONES,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
    ) -> None:
        check_choice("action_space", action_space, ACTION_SPACES)
        check_choice("modality", modality, MODALITIES)
        check_choice("route_order", route_order, ROUTE_ORDERS)
        check_positive_int("verify_iter", verify_iter)
        check_positive_int("image_size", image_size)
        check_positive_int("max_milestones", max_milestones)  # limits on the route data (TaskConfig's)
        check_positive_int("max_image_pixels", max_image_pixels)
        check_rail(straight_line_length, drop_rate)
        super().__init__(image_size if modality == "image" else None)
        self.folder = load_route_folder(routes, max_milestones, max_image_pixels)
        self.action_space_name, self.modality, self.route_order = action_space, modality, route_order
        self.verify_iter, self.straight_line_length = verify_iter, straight_line_length
        self.drop_rate = float(drop_rate)
        self.image_size = image_size
        self.rewards = reward_table(DEFAULT_REWARDS, rewards)
        self.templates = template_table(DEFAULT_TEMPLATES, TEMPLATE_FIELDS, templates)
        self.revision_template = self.templates["revision"]
        choices = COMPASS if action_space == "absolute" else RELATIVE_WORDS
        self._valid = frozenset({FORWARD, STOP, *(f"turn_direction({c})" for c in choices)})
        self._action_text = fill(self.templates["action_space"], choices=", ".join(choices))
        self.skipped_rail_points = 0  # forward() points left off for want of a panorama, over this env's life
        self._next_sequential = 0
        self._rail: list[RailPoint] = []
        self._index = self._attempt = 0
        self._done = True

    @property
    def num_routes(self) -> int:
        return len(self.folder.routes)

    # --------------------------------------------------------------------------------- gymnasium API

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Pick a route (``options={"route_index": i}`` forces one), draw its rail, prompt at the start."""
        super().reset(seed=seed)
        self.route = self.folder.routes[self._pick_route(options or {})]
        init = self.route.init_heading
        self.init_heading = float(self.np_random.integers(0, 360)) if init is None else init
        self.sentences, relatives = route_sentences(self.route, self.init_heading)
        has_panorama = self.folder.has_panorama if self.folder.has_mapping else None
        self._rail, skipped = build_rail(self.route, self.init_heading, relatives, self.straight_line_length,
                                         self.drop_rate, self.np_random, has_panorama)
        if skipped:
            self.skipped_rail_points += skipped
            warnings.warn(
                f"route {self.route.index} ({self.folder.path}): {skipped} forward() point(s) with no panorama within "
                f"{SNAP_RADIUS_M:.0f} m left off the rail ({self.skipped_rail_points} by this env so far)",
                MissingPanoramaWarning, stacklevel=2,
            )
        if self.modality == "image":  # fail at reset, naming the point, if a start/turn/stop panorama is missing
            for i, point in enumerate(self._rail):
                self.folder.snap(point.geocode, self._where(i))
        self._index, self._attempt, self._done = 0, 0, False
        self._start_point()
        return self._observation(), {**self._info(0, None, False), "skipped_rail_points": skipped}

    def step(self, action: str):
        """Judge one answer at the current rail point; never raises on any answer text."""
        if self._done:
            raise RuntimeError("No V-IRL episode is running (it ended, or never started); call reset() first.")
        judged = self._index
        point = self._rail[judged]
        self._attempt += 1
        verdict = judge(action, point, self.gt_action(point), self._valid, self.templates)
        exhausted = False
        if verdict.correct and self._index == len(self._rail) - 1:
            terminated = True
        elif verdict.correct:
            self._index += 1
            terminated = False
        else:
            self._revise(action, verdict.feedback)
            terminated = exhausted = self._attempt >= self.verify_iter  # a failed route: the paper's terminal
        info = {**self._info(judged, verdict, exhausted), "action_offset": field_offset(action, "action")}
        self._done = terminated
        if verdict.correct and not terminated:
            self._attempt = 0
            self._start_point()
        reward = self.rewards[verdict.outcome] + (self.rewards["budget_exhausted"] if exhausted else 0.0)
        return self._observation(), reward, terminated, False, info

    # --------------------------------------------------------------------------------- expert

    def gt_action(self, point: RailPoint | None = None) -> str:
        """The expert action at ``point`` (default: the current rail point) in this env's action space."""
        point = point or self._current()
        return point.absolute_action if self.action_space_name == "absolute" else point.relative_action

    def expert_answer(self) -> str:
        """True observation, the sentence to execute and the expert action: always earns the top reward."""
        point = self._current()
        return self._answer(point.observation(), self.sentences[point.instruction], self.gt_action(point))

    def suboptimal_answer(self) -> str:
        """A plausible mistake (true observation, wrong action): turn early, miss a turn, or overshoot the end."""
        point = self._current()
        expert = self.gt_action(point)
        if expert == FORWARD:  # act on the next milestone too early
            wrong = self.gt_action(next(p for p in self._rail[self._index :] if p.absolute_action != FORWARD))
        else:  # miss the turn, or walk past the destination
            wrong = FORWARD
        return self._answer(point.observation(), self.sentences[point.instruction], wrong)

    @staticmethod
    def _answer(observation: str, instruction: str, action: str) -> str:
        return json.dumps(
            {"current observation": observation, "current instruction": instruction, "action": action}, indent=2
        )

    # --------------------------------------------------------------------------------- internals

    def _current(self) -> RailPoint:
        if not self._rail:
            raise RuntimeError("No V-IRL episode has started; call reset() first.")
        return self._rail[self._index]

    def _pick_route(self, options: dict[str, Any]) -> int:
        if "route_index" in options:
            index = options["route_index"]
            if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < self.num_routes:
                raise ValueError(f"route_index={index!r} is not valid; it must be in [0, {self.num_routes})")
            return int(index)
        if self.route_order == "sequential":
            index = self._next_sequential % self.num_routes
            self._next_sequential += 1
            return index
        return int(self.np_random.integers(self.num_routes))

    def _where(self, index: int) -> str:
        return f"route {self.route.index} ({self.folder.path}), rail point {index} at {self._rail[index].geocode}"

    def _start_point(self) -> None:
        """A fresh conversation for the current rail point (and its street views)."""
        self._start_conversation(self._prompt(), self._grid() if self.modality == "image" else None)

    def _prompt(self) -> str:
        instructions = "\n".join(f"{i + 1}. {s}" for i, s in enumerate(self.sentences))
        history = []
        for i, point in enumerate(self._rail[: self._index]):
            history += [f"O_{i + 1}: {point.observation()}", f"A_{i + 1}: {self.gt_action(point)}"]
        current = self._rail[self._index]
        if self.modality == "image":  # the landmark must be read from the views; the flag stays in the text
            seen = f"{VIEWS_TEXT}; {INTERSECTION_TEXT}" if current.at_intersection else VIEWS_TEXT
        else:
            seen = current.observation()
        history.append(f"O_{self._index + 1}: {seen}")
        text, history_text = self.templates, "\n".join(history)
        return fill(text[f"prompt_{self.modality}"], task=fill(text["task"]), instructions=instructions,
                    instruction=instructions, observation_format=fill(text["observation_format"]),
                    action_space=self._action_text, history=history_text, obs_act_seq=history_text,
                    answer_format=fill(text["answer_format"]))

    def _grid(self) -> np.ndarray:
        """Four perspective views (front, right, back, left) in a 2x2 grid of ``image_size`` pixels."""
        point, tile = self._rail[self._index], max(self.image_size // 2, 1)
        headings = [point.heading + 90.0 * k for k in range(len(VIEW_ORDER))]
        views = self.folder.views(point.geocode, headings, tile, self._where(self._index))
        grid = np.zeros((self.image_size, self.image_size, 3), np.uint8)
        for k, view in enumerate(views):
            row, col = divmod(k, 2)
            grid[row * tile : (row + 1) * tile, col * tile : (col + 1) * tile] = view
        return grid

    def _info(self, index: int, verdict: Verdict | None, exhausted: bool) -> dict[str, Any]:
        point = self._rail[index]
        return {
            "well_formed": None if verdict is None else verdict.well_formed,
            "budget_exhausted": exhausted,
            "gt_action": self.gt_action(point),
            "success": verdict is not None and verdict.correct and point.absolute_action == STOP,
            "correct": verdict is not None and verdict.correct,
            "feedback": None if verdict is None else verdict.feedback,
            "at_intersection": point.at_intersection,
            "attempt": self._attempt,
            "route_index": self.route.index,
            "rail_index": index,
            "rail_length": len(self._rail),
            "outcome": None if verdict is None else verdict.outcome,
            "recognized": None,
        }
