"""GeneralPoints, the generalised 24 game (SPEC §1): GP-L with ``modality="text"``, GP-VL with ``"image"``.

An episode is one hand. The model answers with a JSON object ``{"cards": [...], "number": [...], "formula":
"..."}``; each attempt is judged by the first failing check of SPEC §1 (VL: cards misread; malformed formula;
wrong numbers; success; wrong value). A failed attempt with budget left continues the conversation with
"You failed this trial because <feedback>"; success terminates, the ``verify_iter``-th failure truncates.

Two decisions beyond the spec, both deliberate:

- An answer with no JSON object at all is malformed (``illegal``) in both modalities: it states no cards, so
  there is nothing to compare with the table, and rating it as a mere misread (-1.5) would pay a VL model
  better for garbage than for a well-formed answer with a bad formula.
- The ``number`` list of the answer is not judged (the spec judges the numbers the formula uses).
"""

from __future__ import annotations

import json
from collections import Counter
from types import MappingProxyType
from typing import Any, Mapping, NamedTuple

from lit_sftrl.envs.arithmetic import FormulaError, evaluate_formula, format_number
from lit_sftrl.envs.base import ChatEnv, check_choice, check_positive_int, reward_table
from lit_sftrl.envs.cards import RANKS, Card, deck, draw_hand, render_table
from lit_sftrl.envs.parsing import extract_json_object
from lit_sftrl.envs.solver import is_solvable, solutions

FACE_CARD_RULES = ("10", "11-13")
SUIT_CHOICES = ("black", "red", "all")
MODALITIES = ("text", "image")
NUM_CARDS_CHOICES = (2, 3, 4, 5, 6)  # placeholders in the prompt go up to 6; 4 is the game
MIN_IMAGE_SIZE = 64
DEFAULT_REWARDS: Mapping[str, float] = MappingProxyType(
    {"misread": -1.5, "illegal": -3.0, "wrong_numbers": -2.0, "success": 5.0, "wrong_value": -1.0}
)
FACE_RANKS = frozenset({"J", "Q", "K"})
# Rejection sampling gives up after this many hands: only a target no hand can reach gets there.
MAX_DRAWS = 10_000

# ----------------------------------------------------------------------------------------------------------
# Wording: every sentence the model reads. Printable ASCII only (the observation space's charset).
# ----------------------------------------------------------------------------------------------------------
PROMPT = (
    "You are an expert {target} points card game player. {seeing}\n"
    "{rule} Each card must be used exactly once.\n"
    "Your goal is to output a formula that evaluates to {target}, using the numbers from the cards and the "
    "operators '+', '-', '*', '/', '(' and ')'.\n"
    "Answer with a JSON object of this form:\n"
    '{{"cards": [{card_slots}], "number": [{number_slots}], "formula": "an equation that equals {target}"}}\n'
    "where 'cards' lists the card labels (A, 2 to 10, J, Q, K), 'number' their values and 'formula' uses "
    "each value once."
)
SEEING = {
    "text": "You are given these {count} cards: {labels}.",
    "image": "You are observing the {count} cards in the image.",
}
RULE = {
    "10": "Note that 'J', 'Q' and 'K' all count as 10, and 'A' counts as 1.",
    "11-13": "Note that 'J', 'Q' and 'K' count as 11, 12 and 13, and 'A' counts as 1.",
}
FEEDBACK = {
    "no_json": "your answer is malformed: {reason}.",
    "misread": "you misread the cards: the cards you listed are not the cards in the image.",
    "illegal": "your formula is illegal: {reason}.",
    "no_formula": "your answer has no 'formula'.",
    "wrong_numbers": "your formula must use each of the card values {values} exactly once, but {problem}.",
    "extra": "it uses {numbers}, which the cards do not provide,",
    "missing": "it leaves out {numbers}",
    "wrong_value": "your formula evaluates to {value}, not {target}.",
}
# Whether a hand is playable depends only on its sorted labels, the rule and the target: memoised per process
# and shared by all envs, so that after warm-up a draw costs one dict lookup.
_PLAYABLE: dict[tuple[str, int], dict[tuple[str, ...], bool]] = {}

EPISODE_OVER = "the episode is over (solved or out of attempts); call reset() before step()"
NO_HAND = "no hand has been dealt; call reset() first"


class Verdict(NamedTuple):
    """How one attempt was judged: the reward key, the feedback (None on success), the card check."""

    outcome: str | None  # a key of DEFAULT_REWARDS; None before any attempt
    feedback: str | None
    recognized: bool | None


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
    ) -> None:
        check_positive_int("target", target)
        check_positive_int("num_cards", num_cards)
        check_choice("num_cards", num_cards, NUM_CARDS_CHOICES)
        check_choice("face_card_rule", face_card_rule, FACE_CARD_RULES)
        check_choice("suits", suits, SUIT_CHOICES)
        check_choice("modality", modality, MODALITIES)
        check_positive_int("verify_iter", verify_iter)
        check_positive_int("image_size", image_size)
        if image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"image_size={image_size!r} is not valid; it must be at least {MIN_IMAGE_SIZE}")
        super().__init__(image_size if modality == "image" else None)
        self.target, self.num_cards, self.face_card_rule = target, num_cards, face_card_rule
        self.suits, self.modality, self.verify_iter, self.image_size = suits, modality, verify_iter, image_size
        self.rewards: dict[str, float] = reward_table(DEFAULT_REWARDS, rewards)
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
        return self._observation(), self._info(Verdict(None, None, None), correct=False)

    def step(self, action: Any) -> tuple[dict, float, bool, bool, dict]:
        """Judge one answer. Never raises on the answer itself, whatever it is; only on a finished episode."""
        if self._over:
            raise RuntimeError(EPISODE_OVER if self._hand else NO_HAND)
        self._attempt += 1
        verdict = self.judge(action)
        success = verdict.outcome == "success"
        truncated = not success and self._attempt >= self.verify_iter
        self._over = success or truncated
        if not success:
            # Also on truncation: the obs is then the state the episode stopped in, for value bootstrapping.
            self._revise(action, verdict.feedback or "")
        return self._observation(), self.rewards[verdict.outcome], success, truncated, self._info(verdict, success)

    # -- judging ------------------------------------------------------------------------------------------

    def judge(self, answer: Any) -> Verdict:
        """The first failing check of SPEC §1 for ``answer`` on the current hand (no state change)."""
        parsed, reason = extract_json_object(answer)
        image = self.modality == "image"
        if parsed is None:
            return Verdict("illegal", FEEDBACK["no_json"].format(reason=reason), False if image else None)
        recognized = _stated_labels(parsed.get("cards")) == Counter(self._labels) if image else None
        if recognized is False:
            return Verdict("misread", FEEDBACK["misread"], recognized)
        if "formula" not in parsed:
            return Verdict("illegal", FEEDBACK["no_formula"], recognized)
        try:
            evaluation = evaluate_formula(parsed["formula"], self.target)
        except FormulaError as error:
            return Verdict("illegal", FEEDBACK["illegal"].format(reason=error), recognized)
        problem = _number_problem(Counter(evaluation.numbers), Counter(self._numbers))
        if problem:
            feedback = FEEDBACK["wrong_numbers"].format(values=_join(sorted(self._numbers)), problem=problem)
            return Verdict("wrong_numbers", feedback, recognized)
        if evaluation.value != self.target:
            feedback = FEEDBACK["wrong_value"].format(value=format_number(evaluation.value), target=self.target)
            return Verdict("wrong_value", feedback, recognized)
        return Verdict("success", None, recognized)

    # -- experts ------------------------------------------------------------------------------------------

    def expert_answer(self) -> str:
        """True cards, their values and one solution drawn with ``self.np_random``: always earns ``success``."""
        found = solutions(self._sorted_values(), self.target)
        return self._answer_text(f"{found[int(self.np_random.integers(len(found)))]}={self.target}")

    def suboptimal_answer(self) -> str:
        """A plausible wrong answer (SPEC §4's multi-turn ablation): true cards and values, a formula that uses
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
        """Uniform over the hands that satisfy SPEC §1 (rejection sampling; solvability is a table lookup)."""
        known = self._playable_labels
        for _ in range(MAX_DRAWS):
            hand = draw_hand(self._deck, self.num_cards, self.np_random)
            labels = tuple(sorted([card.rank for card in hand]))
            playable = known.get(labels)
            if playable if playable is not None else self._playable(labels):
                return hand
        raise RuntimeError(f"no playable hand in {MAX_DRAWS} draws: can {self.num_cards} cards make {self.target}?")

    def _playable(self, labels: tuple[str, ...]) -> bool:
        """SPEC §1 beyond distinct cards from the deck: a J, Q or K under "11-13", and solvable (memoised)."""
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
        if len(hand) != self.num_cards or len(set(hand)) != len(hand) or not set(hand) <= set(self._deck):
            raise ValueError(
                f"options['hand']={cards!r} is not valid; it must be {self.num_cards} distinct (rank, suit) cards "
                f"of the {self.suits!r} deck"
            )
        if not self._playable(tuple(card.rank for card in hand)):
            raise ValueError(
                f"options['hand']={cards!r} is not valid; it must make {self.target} "
                "(and hold a J, Q or K under face_card_rule='11-13')"
            )
        return hand

    def _prompt(self) -> str:
        return self._prompt_template.replace("{labels}", ", ".join(f"'{label}'" for label in self._labels))

    def _prompt_template_for(self) -> str:
        """The task prompt with everything but the card labels filled in (they change every reset)."""
        count = self.num_cards
        return PROMPT.format(
            target=self.target,
            seeing=SEEING[self.modality].format(count=count, labels="{labels}"),
            rule=RULE[self.face_card_rule],
            card_slots=", ".join("xyzwuv"[:count]),
            number_slots=", ".join("abcdef"[:count]),
        )

    def _answer_text(self, formula: str) -> str:
        return json.dumps({"cards": self.labels, "number": self.numbers, "formula": formula})

    def _info(self, verdict: Verdict, correct: bool) -> dict[str, Any]:
        return {
            "cards": list(self._labels),
            "numbers": list(self._numbers),
            "success": correct,  # an episode succeeds exactly when an attempt is correct, which ends it
            "correct": correct,
            "recognized": verdict.recognized,
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


def _number_problem(used: Counter, expected: Counter) -> str:
    """Why the formula's numbers are not the card values ('' when they are)."""
    if used == expected:
        return ""
    parts = []
    for key, difference in (("extra", used - expected), ("missing", expected - used)):
        if difference:
            parts.append(FEEDBACK[key].format(numbers=_join(sorted(difference.elements()))))
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
