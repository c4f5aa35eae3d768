"""GeneralPoints, the generalised 24 game (docs/spec.md §1): GP-L with ``modality="text"``, GP-VL with ``"image"``.

An episode is one hand. The model answers with a JSON object ``{"cards": [...], "number": [...], "formula":
"..."}``; each attempt is judged by the first failing check of docs/spec.md §1 (VL: cards misread; malformed formula;
wrong numbers; success; wrong value). A failed attempt with budget left continues the conversation with
"You failed this trial because <feedback>". Success terminates the episode; so does the ``verify_iter``-th
failure (the paper's MDP: the budget's end is a terminal, shown in the prompt by the attempts so far), whose
reward is its verdict plus the ``budget_exhausted`` penalty of the reward table (default -1).

Hands (``sampling``): ``"iid"`` (default) deals as the original code did, whose draws made the paper's numbers:
ranks i.i.d. with replacement, suits at random within the colour, under the 11-13 rule ``num_cards - 1``
such ranks plus one forced J/Q/K, shuffled. ``"deck"`` deals distinct cards from the colour's deck and, under
the 11-13 rule, keeps only hands with a face card (the paper's prose). Both keep solvable hands only. Over
solvable hands the 11-13 rule then gives 1.62 J/Q/K per hand (iid) vs 1.32 (deck).

Wording: every prompt and feedback text is a template (see ``lit_sftrl.envs.templates``); ``templates``
replaces any of ``DEFAULT_TEMPLATES``, whose fields ``TEMPLATE_FIELDS`` lists.

Every step's ``info`` holds ``success``, ``correct``, ``recognized`` (VL: the stated cards are the true ones;
None for GP-L), ``well_formed`` (the answer is a JSON object with every key the judge reads: ``formula``, and
``cards`` in VL), ``budget_exhausted`` (this attempt used up the budget without success), ``outcome``,
``feedback``, ``attempt``, ``cards``, ``numbers`` and ``action_offset`` (where the answer's ``formula`` field
begins, or None: the text before it is reasoning, which PPO's ``thought_coef`` may weigh differently).

Two decisions beyond the spec, both deliberate:

- An answer with no JSON object at all is malformed (``illegal``) in both modalities: it states no cards, so
  there is nothing to compare with the table, and rating it as a mere misread (-1.5) would pay a VL model
  better for garbage than for a well-formed answer with a bad formula.
- The ``number`` list of the answer is not judged (the spec judges the numbers the formula uses).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

from lit_sftrl.envs.arithmetic import FormulaError, evaluate_formula, format_number
from lit_sftrl.envs.base import ChatEnv, check_choice, check_positive_int, reward_table
from lit_sftrl.envs.cards import RANKS, SUIT_GROUPS, Card, deck, draw_hand, draw_iid_hand, render_table
from lit_sftrl.envs.parsing import extract_json_object, field_offset
from lit_sftrl.envs.solver import is_solvable, solutions
from lit_sftrl.envs.templates import fill, template_table

FACE_CARD_RULES = ("10", "11-13")
SUIT_CHOICES = ("black", "red", "all")
MODALITIES = ("text", "image")
SAMPLINGS = ("iid", "deck")
NUM_CARDS_CHOICES = (2, 3, 4, 5, 6)  # placeholders in the prompt go up to 6; 4 is the game
MIN_IMAGE_SIZE = 64
DEFAULT_REWARDS: Mapping[str, float] = MappingProxyType(
    {"misread": -1.5, "illegal": -3.0, "wrong_numbers": -2.0, "success": 5.0, "wrong_value": -1.0,
     "budget_exhausted": -1.0}  # added to the verdict of the attempt that uses up the budget
)
FACE_RANKS = frozenset({"J", "Q", "K"})
FORCED_FACES = ("J", "Q", "K")
# Rejection sampling gives up after this many hands: only a target no hand can reach gets there.
MAX_DRAWS = 10_000

# ----------------------------------------------------------------------------------------------------------
# Wording: every sentence the model reads, as templates (printable ASCII: the observation space's charset).
# ----------------------------------------------------------------------------------------------------------
DEFAULT_TEMPLATES: Mapping[str, str] = MappingProxyType({
    "prompt": (
        "You are an expert {target} points card game player. {seeing}\n"
        "{face_card_rule} Each card must be used exactly once.\n"
        "Your goal is to output a formula that evaluates to {target}, using the numbers from the cards and the "
        "operators '+', '-', '*', '/', '(' and ')'.\n"
        "{answer_format}"
    ),
    "seeing_text": "You are given these {num_cards} cards: {cards}.",
    "seeing_image": "You are observing the {num_cards} cards in the image.",
    "face_card_rule_10": "Note that 'J', 'Q' and 'K' all count as 10, and 'A' counts as 1.",
    "face_card_rule_11-13": "Note that 'J', 'Q' and 'K' count as 11, 12 and 13, and 'A' counts as 1.",
    "answer_format": (
        "Answer with a JSON object of this form:\n"
        '{{"cards": [{card_slots}], "number": [{number_slots}], "formula": "an equation that equals {target}"}}\n'
        "where 'cards' lists the card labels (A, 2 to 10, J, Q, K), 'number' their values and 'formula' uses "
        "each value once."
    ),
    "revision": "You failed this trial because {feedback}",
    "feedback_no_json": "your answer is malformed: {reason}.",
    "feedback_misread": "you misread the cards: the cards you listed are not the cards in the image.",
    "feedback_illegal": "your formula is illegal: {reason}.",
    "feedback_no_formula": "your answer has no 'formula'.",
    "feedback_wrong_numbers": "your formula must use each of the card values {values} exactly once, but {problem}.",
    "feedback_extra": "it uses {numbers}, which the cards do not provide,",
    "feedback_missing": "it leaves out {numbers}",
    "feedback_wrong_value": "your formula evaluates to {value}, not {target}.",
})
_PROMPT_FIELDS = frozenset({"target", "num_cards", "cards", "card_slots", "number_slots"})
# ``target_number`` and ``face_card_msg`` are the original prompt library's names, so its prompts paste in.
TEMPLATE_FIELDS: Mapping[str, frozenset[str]] = MappingProxyType({
    "prompt": _PROMPT_FIELDS | {"seeing", "face_card_rule", "answer_format", "target_number", "face_card_msg"},
    "seeing_text": _PROMPT_FIELDS, "seeing_image": _PROMPT_FIELDS,
    "face_card_rule_10": frozenset(), "face_card_rule_11-13": frozenset(),
    "answer_format": _PROMPT_FIELDS,
    "revision": frozenset({"feedback"}),
    "feedback_no_json": frozenset({"reason"}), "feedback_misread": frozenset(),
    "feedback_illegal": frozenset({"reason"}), "feedback_no_formula": frozenset(),
    "feedback_wrong_numbers": frozenset({"values", "problem"}),
    "feedback_extra": frozenset({"numbers"}), "feedback_missing": frozenset({"numbers"}),
    "feedback_wrong_value": frozenset({"value", "target"}),
})
_CARDS_SLOT = "\x00cards\x00"  # stands for the card labels in the prompt prepared at construction
# Whether a hand is playable depends only on its sorted labels, the rule and the target: memoised per process
# and shared by all envs, so that after warm-up a draw costs one dict lookup.
_PLAYABLE: dict[tuple[str, int], dict[tuple[str, ...], bool]] = {}

EPISODE_OVER = "the episode is over (solved or out of attempts); call reset() before step()"
NO_HAND = "no hand has been dealt; call reset() first"


class Verdict(NamedTuple):
    """How one attempt was judged: the reward key, the feedback (None on success), the card check, and
    whether the answer was a JSON object with every key the judge reads."""

    outcome: str | None  # a key of DEFAULT_REWARDS; None before any attempt
    feedback: str | None
    recognized: bool | None
    well_formed: bool | None = None  # None before any attempt


class GeneralPointsEnv(ChatEnv):
    """Make ``target`` from the values of ``num_cards`` cards with ``+ - * /`` (gymnasium API, text actions)."""

    def __init__(
        self,
        target: int = 24,
        num_cards: int = 4,
        face_card_rule: str = "10",
        suits: str = "black",
        modality: str = "text",
        verify_iter: int = 5,
        image_size: int = 224,
        rewards: Mapping[str, float] | None = None,
        sampling: str = "iid",
        templates: Mapping[str, str] | None = None,
    ) -> None:
        check_positive_int("target", target)
        check_positive_int("num_cards", num_cards)
        check_choice("num_cards", num_cards, NUM_CARDS_CHOICES)
        check_choice("face_card_rule", face_card_rule, FACE_CARD_RULES)
        check_choice("suits", suits, SUIT_CHOICES)
        check_choice("modality", modality, MODALITIES)
        check_choice("sampling", sampling, SAMPLINGS)
        check_positive_int("verify_iter", verify_iter)
        check_positive_int("image_size", image_size)
        if image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"image_size={image_size!r} is not valid; it must be at least {MIN_IMAGE_SIZE}")
        super().__init__(image_size if modality == "image" else None)
        self.target, self.num_cards, self.face_card_rule = target, num_cards, face_card_rule
        self.suits, self.modality, self.verify_iter, self.image_size = suits, modality, verify_iter, image_size
        self.rewards: dict[str, float] = reward_table(DEFAULT_REWARDS, rewards)
        self.sampling = sampling
        self.templates = template_table(DEFAULT_TEMPLATES, TEMPLATE_FIELDS, templates)
        self.revision_template = self.templates["revision"]
        self._deck = deck(suits)
        self._value = card_values(face_card_rule)
        self._playable_labels = _PLAYABLE.setdefault((face_card_rule, target), {})
        self._prompt_template = self._prompt_template_for()
        self._hand: tuple[Card, ...] = ()
        self._labels: list[str] = []
        self._numbers: list[int] = []
        self._attempt = 0
        self._over = True

    # -- gymnasium API ------------------------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        """Deal a new solvable hand (deterministic for a given ``seed``) and pose the task.

        ``options={"hand": [("3", "spades"), ...]}`` plays the given cards instead (fixed evaluation
        episodes, tests); they must be a hand the sampler could have dealt.
        """
        super().reset(seed=seed)
        chosen = (options or {}).get("hand")
        self._hand = self._deal() if chosen is None else self._chosen_hand(chosen)
        self._labels = [card.rank for card in self._hand]
        self._numbers = [self._value[card.rank] for card in self._hand]
        self._attempt, self._over = 0, False
        image = render_table(self._hand, self.image_size) if self.modality == "image" else None
        self._start_conversation(self._prompt(), image)
        return self._observation(), self._info(Verdict(None, None, None), correct=False, exhausted=False)

    def step(self, action: Any) -> tuple[dict, float, bool, bool, dict]:
        """Judge one answer. Never raises on the answer itself, whatever it is; only on a finished episode."""
        if self._over:
            raise RuntimeError(EPISODE_OVER if self._hand else NO_HAND)
        self._attempt += 1
        verdict = self.judge(action)
        success = verdict.outcome == "success"
        exhausted = not success and self._attempt >= self.verify_iter
        self._over = success or exhausted
        reward = self.rewards[verdict.outcome] + (self.rewards["budget_exhausted"] if exhausted else 0.0)
        if not success:  # also when the budget is used up: the last observation shows why the episode ended
            self._revise(action, verdict.feedback or "")
        # Never truncated: the budget's end is a terminal of the task (the prompt shows the attempts so far).
        info = {**self._info(verdict, success, exhausted), "action_offset": field_offset(action, "formula")}
        return self._observation(), reward, self._over, False, info

    # -- judging ------------------------------------------------------------------------------------------

    def judge(self, answer: Any) -> Verdict:
        """The first failing check of docs/spec.md §1 for ``answer`` on the current hand (no state change)."""
        parsed, reason = extract_json_object(answer)
        image, text = self.modality == "image", self.templates
        if parsed is None:
            return Verdict("illegal", fill(text["feedback_no_json"], reason=reason), False if image else None, False)
        well_formed = "formula" in parsed and ("cards" in parsed or not image)
        recognized = _stated_labels(parsed.get("cards")) == Counter(self._labels) if image else None
        if recognized is False:
            return Verdict("misread", fill(text["feedback_misread"]), recognized, well_formed)
        if "formula" not in parsed:
            return Verdict("illegal", fill(text["feedback_no_formula"]), recognized, well_formed)
        try:
            evaluation = evaluate_formula(parsed["formula"], self.target)
        except FormulaError as error:
            return Verdict("illegal", fill(text["feedback_illegal"], reason=error), recognized, well_formed)
        problem = _number_problem(Counter(evaluation.numbers), Counter(self._numbers), text)
        if problem:
            feedback = fill(text["feedback_wrong_numbers"], values=_join(sorted(self._numbers)), problem=problem)
            return Verdict("wrong_numbers", feedback, recognized, well_formed)
        if evaluation.value != self.target:
            value = format_number(evaluation.value)
            return Verdict("wrong_value", fill(text["feedback_wrong_value"], value=value, target=self.target),
                           recognized, well_formed)
        return Verdict("success", None, recognized, well_formed)

    # -- experts ------------------------------------------------------------------------------------------

    def expert_answer(self) -> str:
        """True cards, their values and one solution drawn with ``self.np_random``: always earns ``success``."""
        found = solutions(self._sorted_values(), self.target)
        return self._answer_text(f"{found[int(self.np_random.integers(len(found)))]}={self.target}")

    def suboptimal_answer(self) -> str:
        """A plausible wrong answer (docs/spec.md §4's multi-turn ablation): true cards and values, a formula that uses
        every value once but misses the target; if random tries keep hitting it, one that overuses a value."""
        values = self.numbers
        for _ in range(32):
            order = self.np_random.permutation(len(values))
            operators = self.np_random.choice(list("+-*"), size=len(values) - 1)
            formula = _chain([values[i] for i in order], operators)
            if evaluate_formula(formula).value != self.target:
                return self._answer_text(f"{formula}={self.target}")
        return self._answer_text(_chain([values[0] + 1] + values[1:], ["+"] * (len(values) - 1)))

    # -- state --------------------------------------------------------------------------------------------

    @property
    def hand(self) -> tuple[Card, ...]:
        """The cards dealt, left to right (rank and suit)."""
        return self._require_hand()

    @property
    def labels(self) -> list[str]:
        """Card labels of the hand, left to right."""
        self._require_hand()
        return list(self._labels)

    @property
    def numbers(self) -> list[int]:
        """Card values under the face-card rule, left to right."""
        self._require_hand()
        return list(self._numbers)

    def _require_hand(self) -> tuple[Card, ...]:
        if not self._hand:
            raise RuntimeError(NO_HAND)
        return self._hand

    def _sorted_values(self) -> tuple[int, ...]:
        return tuple(sorted(self.numbers))

    def _deal(self) -> tuple[Card, ...]:
        """The sampler's hands, kept when playable (rejection sampling; solvability is a table lookup)."""
        known = self._playable_labels
        forced = FORCED_FACES if self.face_card_rule == "11-13" else ()
        for _ in range(MAX_DRAWS):
            if self.sampling == "iid":
                hand = draw_iid_hand(SUIT_GROUPS[self.suits], self.num_cards, self.np_random, forced)
            else:
                hand = draw_hand(self._deck, self.num_cards, self.np_random)
            labels = tuple(sorted([card.rank for card in hand]))
            playable = known.get(labels)
            if playable if playable is not None else self._playable(labels):
                return hand
        raise RuntimeError(f"no playable hand in {MAX_DRAWS} draws: can {self.num_cards} cards make {self.target}?")

    def _playable(self, labels: tuple[str, ...]) -> bool:
        """Solvable, and a J, Q or K under "11-13" (the iid sampler forces one; deck hands are filtered)."""
        labels = tuple(sorted(labels))
        if labels not in self._playable_labels:
            has_face = not FACE_RANKS.isdisjoint(labels)
            solvable = is_solvable(tuple(sorted(self._value[label] for label in labels)), self.target)
            self._playable_labels[labels] = solvable and (has_face or self.face_card_rule == "10")
        return self._playable_labels[labels]

    def _chosen_hand(self, cards: Any) -> tuple[Card, ...]:
        try:
            hand = tuple(Card(*card) for card in cards)
        except TypeError:
            hand = ()
        distinct = len(set(hand)) == len(hand) or self.sampling == "iid"  # iid draws may repeat a card
        if len(hand) != self.num_cards or not distinct or not set(hand) <= set(self._deck):
            kind = "distinct " if self.sampling == "deck" else ""
            raise ValueError(
                f"options['hand']={cards!r} is not valid; it must be {self.num_cards} {kind}(rank, suit) cards "
                f"of the {self.suits!r} deck"
            )
        if not self._playable(tuple(card.rank for card in hand)):
            raise ValueError(
                f"options['hand']={cards!r} is not valid; it must make {self.target} "
                "(and hold a J, Q or K under face_card_rule='11-13')"
            )
        return hand

    def _prompt(self) -> str:
        return self._prompt_template.replace(_CARDS_SLOT, ", ".join(f"'{label}'" for label in self._labels))

    def _prompt_template_for(self) -> str:
        """The task prompt with everything but the card labels filled in (they change every reset)."""
        count, text = self.num_cards, self.templates
        fields = dict(target=self.target, num_cards=count, cards=_CARDS_SLOT, card_slots=", ".join("xyzwuv"[:count]),
                      number_slots=", ".join("abcdef"[:count]))
        rule = fill(text[f"face_card_rule_{self.face_card_rule}"])
        return fill(text["prompt"], **fields, seeing=fill(text[f"seeing_{self.modality}"], **fields),
                    face_card_rule=rule, face_card_msg=rule, target_number=self.target,
                    answer_format=fill(text["answer_format"], **fields))

    def _answer_text(self, formula: str) -> str:
        return json.dumps({"cards": self.labels, "number": self.numbers, "formula": formula})

    def _info(self, verdict: Verdict, correct: bool, exhausted: bool) -> dict[str, Any]:
        return {
            "cards": list(self._labels),
            "numbers": list(self._numbers),
            "success": correct,  # an episode succeeds exactly when an attempt is correct, which ends it
            "correct": correct,
            "recognized": verdict.recognized,
            "well_formed": verdict.well_formed,
            "budget_exhausted": exhausted,
            "feedback": verdict.feedback,
            "attempt": self._attempt,
            "outcome": verdict.outcome,
        }


def card_values(face_card_rule: str) -> dict[str, int]:
    """Rank label -> value: A is 1, numbers are themselves, J/Q/K are 10 or 11/12/13."""
    check_choice("face_card_rule", face_card_rule, FACE_CARD_RULES)
    values = {rank: position + 1 for position, rank in enumerate(RANKS)}
    if face_card_rule == "10":
        values.update({rank: 10 for rank in FACE_RANKS})
    return values


def _stated_labels(cards: Any) -> Counter | None:
    """The multiset of labels an answer states (``"k"``, ``" K"`` and ``"K"`` alike; ``10`` as ``"10"``)."""
    if not isinstance(cards, list):
        return None
    return Counter(str(card).strip().upper() for card in cards)


def _number_problem(used: Counter, expected: Counter, text: Mapping[str, str]) -> str:
    """Why the formula's numbers are not the card values ('' when they are)."""
    if used == expected:
        return ""
    parts = []
    for key, difference in (("feedback_extra", used - expected), ("feedback_missing", expected - used)):
        if difference:
            parts.append(fill(text[key], numbers=_join(sorted(difference.elements()))))
    return " and ".join(parts).rstrip(",")


def _join(numbers: list[int]) -> str:
    """``1, 2 and 3``."""
    words = [str(number) for number in numbers]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def _chain(values: list[int], operators: Any) -> str:
    """``a op b op c ...`` applied left to right, parenthesised where precedence would reorder it."""
    text, previous = str(values[0]), "*"  # a lone number never needs parentheses
    for operator, value in zip(operators, values[1:]):
        if operator in "*/" and previous in "+-":
            text = f"({text})"
        text, previous = f"{text}{operator}{value}", operator
    return text
