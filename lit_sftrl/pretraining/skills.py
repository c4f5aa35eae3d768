"""The skills corpus a tiny base model is pretrained on: general knowledge the tasks rely on, never the tasks.

The paper's base model (Llama-3.2-Vision) arrives knowing arithmetic, both face-card conventions and relative
directions; post-training then either memorises one rule (SFT) or keeps following the rule the prompt states
(RL). A randomly initialised tiny model knows none of it, so this module writes that prior knowledge as short
question/answer chats:

- ``arithmetic``: reach a stated target from numbers 1-13 with ``+ - * /`` and brackets (many targets);
- ``cards``: card values under "J, Q, K count 10" and under "J, Q, K count 11, 12, 13", in varied sentences,
  alone or followed by arithmetic on the values;
- ``compass``: compass words and degrees, and relative turns both ways (where a turn leads; which turn leads
  from one heading to another);
- ``json``: any of the facts above asked for as a JSON object whose keys the question names;
- ``allowed_words``: directions naming both a turn and a heading, answered with the kind of word the question
  lists as allowed (turn words or compass words): which rule applies is stated in the question, not fixed;
- ``follow_unit`` / ``follow_convention`` / ``follow_form``: one question body asked under one of several rules
  the question states (the unit of a heading, turn, side or distance; a card-value or counting convention; the
  answer's form: alone, a named JSON key, a label, brackets, capitals), the answer following the drawn rule; the
  same body recurs under other rules, so only reading the rule scores (:func:`rule_variants` gives them all);
- ``card_image`` / ``street_image``: rendered card tables (every suit and colour) and street-view panels of
  every city style, described in text (:mod:`lit_sftrl.pretraining.skill_images`).

What it must never contain is the tasks' own prompt wording or answer layout (the JSON keys of the answers):
the base would then already be an SFT model of the task. ``TASK_ANSWER_KEYS`` is excluded from the JSON key
pool and the tests check the corpus against the environments' prompts.

Item ``i`` of a corpus is a pure function of ``(seed, i)``: the corpus is reproducible, needs no storage and can
be sliced (a held-out probe uses another seed).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from functools import partial
from typing import Any

import numpy as np

from lit_sftrl.core.seeding import pick
from lit_sftrl.envs.cards import RANKS
from lit_sftrl.envs.general_points import card_values
from lit_sftrl.envs.routes import COMPASS, wrap_degrees
from lit_sftrl.envs.solver import solutions
from lit_sftrl.envs.virl import relative_word

Conversation = dict[str, Any]  # {"messages": [user, assistant], "image": ndarray | None}, as SFT batches take

# The answer keys of the tasks (GeneralPoints, V-IRL): never used as keys here.
TASK_ANSWER_KEYS = frozenset({"cards", "number", "formula", "current observation", "current instruction", "action"})
TEXT_SKILLS = ("arithmetic", "cards", "compass", "json", "allowed_words", "follow_unit", "follow_convention",
               "follow_form")
# The skills whose question states the rule its answer follows (configs/pretrain_rules.yaml weights them up).
RULE_SKILLS = ("allowed_words", "follow_unit", "follow_convention", "follow_form")
IMAGE_SKILLS = ("card_image", "street_image")
RANK_NAMES = {"A": "ace", "J": "jack", "Q": "queen", "K": "king"}


@dataclass
class SkillsConfig:
    """What the corpus holds.

    Args:
        size: number of items (question/answer chats) in the corpus.
        seed: item ``i`` is drawn from ``(seed, i)`` alone.
        image_share: share of items carrying an image (cards or street panels); 0 = text only.
        image_size: side of the rendered images in pixels (the tasks' default is 224).
        street_scenes: distinct street renderings per city style (each costs ~0.1 s once, then is cached).
        weights: relative frequency of the text skills, in the order of ``TEXT_SKILLS``. A skill appended with
            weight 0 leaves every draw of the others as it was (the default base predates ``allowed_words`` and
            the ``follow_*`` skills, which it leaves at 0).
    """

    size: int = 20000
    seed: int = 0
    image_share: float = 0.1
    image_size: int = 224
    street_scenes: int = 48
    weights: tuple[float, ...] = (0.35, 0.25, 0.25, 0.15, 0.0, 0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        # a config written before a skill was appended names fewer weights: the new ones are 0 (no draw changes)
        self.weights = tuple(self.weights) + (0.0,) * (len(TEXT_SKILLS) - len(self.weights))
        if (self.size < 1 or not 0.0 <= self.image_share <= 1.0 or len(self.weights) != len(TEXT_SKILLS)
                or min(self.weights) < 0 or sum(self.weights) <= 0):
            raise ValueError(f"invalid skills config {self}: size >= 1, image_share in [0, 1], "
                             f"one non-negative weight per skill of {TEXT_SKILLS}, not all 0")


def skill_item(config: SkillsConfig, index: int, skill: str | None = None) -> Conversation:
    """Corpus item ``index``: one user question and the assistant's answer (plus an image for image skills)."""
    rng = np.random.default_rng([config.seed, index])
    drawn = _draw_skill(config, rng)  # drawn even when ``skill`` is forced, so the rest of the stream is the same
    skill = skill or drawn
    image, meta = None, {}
    if skill in IMAGE_SKILLS:  # rendering imports the card and city renderers: only when an image is drawn
        from lit_sftrl.pretraining.skill_images import card_image, street_image

        if skill == "card_image":
            question, answer, image = card_image(rng, config.image_size)
        else:
            question, answer, image, meta = street_image(rng, config.street_scenes, config.image_size, config.seed)
    else:
        question, answer, meta = _TEXT[skill](rng)
    return _conversation(question, answer, image, skill, meta)


def _conversation(question: str, answer: str, image: np.ndarray | None, skill: str, check: dict) -> Conversation:
    user = [{"type": "image"}, {"type": "text", "text": question}] if image is not None else question
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "image": image, "skill": skill, "check": check}


def item_skill(config: SkillsConfig, index: int) -> str:
    """The skill of item ``index``, without building it (to batch image and text items apart)."""
    return _draw_skill(config, np.random.default_rng([config.seed, index]))


def _draw_skill(config: SkillsConfig, rng: np.random.Generator) -> str:
    if rng.random() < config.image_share:
        return IMAGE_SKILLS[int(rng.integers(len(IMAGE_SKILLS)))]
    weights = np.asarray(config.weights, dtype=float)
    return TEXT_SKILLS[int(rng.choice(len(TEXT_SKILLS), p=weights / weights.sum()))]


def corpus_texts(config: SkillsConfig) -> list[str]:
    """The corpus's text (questions and answers), e.g. for the tokenizer; images are not rendered."""
    texts, text_only = [], SkillsConfig(**{**config.__dict__, "image_share": 0.0})
    for index in range(config.size):
        item = skill_item(text_only, index)
        texts += [message_text(message) for message in item["messages"]]
    return texts


def message_text(message: dict[str, Any]) -> str:
    content = message["content"]
    return content if isinstance(content, str) else " ".join(p.get("text", "") for p in content)


def _spaced(formula: str, rng: np.random.Generator) -> str:
    """Solver formulas are unspaced; people write both, so both are shown."""
    if rng.random() < 0.5:
        return formula
    for symbol in "+-*/":
        formula = formula.replace(symbol, f" {symbol} ")
    return formula


# ------------------------------------------------------------------------------------------ arithmetic


_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


def _random_expression(rng: np.random.Generator, numbers: list[int]) -> tuple[str, Fraction | None]:
    """Combine ``numbers`` pairwise in random order with random operators (exact arithmetic): an expression that
    uses each number once, and its value (None on a division by zero). Forward generation costs microseconds,
    where searching for a given target costs milliseconds per multiset and target."""
    nodes = [(str(n), Fraction(n), 3) for n in numbers]  # (text, value, precedence of the outermost operator)
    while len(nodes) > 1:
        i, j = (int(k) for k in rng.choice(len(nodes), size=2, replace=False))
        (a, x, pa), (b, y, pb) = nodes[i], nodes[j]
        op = pick(rng, "+-*/")
        if op == "/" and y == 0:
            return "", None
        p = _PRECEDENCE[op]
        a = f"({a})" if pa < p else a
        b = f"({b})" if pb < p or (pb == p and op in "-/") else b
        value = {"+": x + y, "-": x - y, "*": x * y, "/": x / y if y else x}[op]
        nodes = [n for k, n in enumerate(nodes) if k not in (i, j)] + [(f"{a}{op}{b}", value, p)]
    return nodes[0][0], nodes[0][1]


def _reach(rng: np.random.Generator, numbers: list[int]) -> tuple[int, str]:
    """A positive integer target up to 100 that ``numbers`` make, and how; 24 (via the solver) a quarter of the
    time when the numbers allow it, since it is the most common such puzzle."""
    if len(numbers) <= 4 and rng.random() < 0.25:
        found = solutions(tuple(sorted(numbers)), 24)
        if found:
            return 24, pick(rng, found)
    for _ in range(200):
        text, value = _random_expression(rng, numbers)
        if value is not None and value.denominator == 1 and 0 < value <= 100:
            return int(value), text
    return sum(numbers), "+".join(map(str, numbers))


def _arithmetic_fact(rng: np.random.Generator, values: list[int] | None = None) -> dict[str, Any]:
    """Numbers in 1..13 (or the given card values), a target they make, and one expression making it."""
    if values is None:
        values = [int(v) for v in rng.integers(1, 14, size=int(pick(rng, (2, 3, 3, 4, 4, 4, 4, 5))))]
    target, formula = _reach(rng, values)
    return {"numbers": values, "target": target, "expression": _spaced(formula, rng)}


def _arithmetic(rng: np.random.Generator) -> tuple[str, str, dict]:
    fact = _arithmetic_fact(rng)
    numbers = ", ".join(map(str, fact["numbers"]))
    target, expression = fact["target"], fact["expression"]
    question = pick(rng, (
        f"Make {target} from {numbers}, using every number once and any of + - * / with brackets.",
        f"How can {numbers} be combined with addition, subtraction, multiplication and division to give {target}?",
        f"Numbers: {numbers}. Target: {target}. Use each number exactly one time.",
        f"Write an expression equal to {target} that uses each of {numbers} once.",
        f"Puzzle: reach {target} with {numbers} (each once; + - * / and parentheses allowed).",
    ))
    answer = pick(rng, (f"{expression} = {target}",) * 2 + (f"One way is {expression} = {target}.",))
    return question, answer, {"numbers": fact["numbers"], "target": target}


# --------------------------------------------------------------------------------------------- cards


def card_value(rank: str, faces_are_ten: bool) -> int:
    """A card's value under either convention: the environment's own rule (one home for card values)."""
    return card_values("10" if faces_are_ten else "11-13")[rank]


def _convention(rng: np.random.Generator, faces_are_ten: bool) -> str:
    """One of many ways of stating a face-card convention (the tasks' own wording is not among them)."""
    if faces_are_ten:
        return pick(rng, (
            "Jacks, queens and kings are each worth 10, and an ace is worth 1.",
            "In this scoring every picture card (J, Q, K) is 10 points and A is 1 point.",
            "Face cards all score ten; aces score one.",
            "Here J = 10, Q = 10, K = 10 and A = 1.",
            "Court cards are valued at 10 and the ace at 1.",
        ))
    return pick(rng, (
        "A jack is worth 11, a queen 12 and a king 13, and an ace is worth 1.",
        "In this scoring J is 11 points, Q is 12 points, K is 13 points and A is 1 point.",
        "Face cards follow their rank order: jack eleven, queen twelve, king thirteen; ace one.",
        "Here J = 11, Q = 12, K = 13 and A = 1.",
        "The jack is valued at 11, the queen at 12, the king at 13 and the ace at 1.",
    ))


def _draw_ranks(rng: np.random.Generator, count: int) -> list[str]:
    ranks = [RANKS[int(i)] for i in rng.integers(len(RANKS), size=count)]
    if rng.random() < 0.6:  # face cards are where the conventions differ: make them common
        ranks[int(rng.integers(count))] = pick(rng, ("J", "Q", "K"))
    return ranks


def _cards(rng: np.random.Generator) -> tuple[str, str, dict]:
    faces_are_ten = bool(rng.random() < 0.5)
    rule = _convention(rng, faces_are_ten)
    kind = int(rng.integers(3))
    if kind == 0:  # one card
        rank = pick(rng, ("J", "Q", "K", "A", *RANKS))
        name = RANK_NAMES.get(rank, rank)
        value = card_value(rank, faces_are_ten)
        return f"{rule} What is a {name} worth?", pick(rng, (f"{value}", f"A {name} is worth {value}.")), {}
    ranks = _draw_ranks(rng, int(pick(rng, (2, 3, 4, 4, 5))))
    values = [card_value(rank, faces_are_ten) for rank in ranks]
    shown = ", ".join(ranks)
    if kind == 1:  # the values of a hand
        question = pick(rng, (f"{rule} What are {shown} worth?", f"{rule} Give the values of the hand {shown}."))
        return question, ", ".join(map(str, values)), {}
    fact = _arithmetic_fact(rng, values)  # values, then arithmetic on them
    question = f"{rule} The hand is {shown}. Using each card's value once, reach {fact['target']}."
    stated = f"The values are {', '.join(map(str, values))}."
    return question, f"{stated} {fact['expression']} = {fact['target']}", {**fact, "prefix": stated}


# ------------------------------------------------------------------------------------------- compass

TURNS = {"left": -90, "right": 90, "slightly left": -45, "slightly right": 45}


def _compass_fact(rng: np.random.Generator) -> dict[str, Any]:
    start = int(rng.integers(8))
    turn = pick(rng, tuple(TURNS))
    end = (start + TURNS[turn] // 45) % 8
    assert relative_word(TURNS[turn]) == turn  # the same words, in the same sense, as the navigation task
    return {"start": COMPASS[start], "turn": turn, "end": COMPASS[end]}


def _compass(rng: np.random.Generator) -> tuple[str, str, dict]:
    fact = _compass_fact(rng)
    start, turn, end = fact["start"], fact["turn"], fact["end"]
    kind = int(rng.integers(4))
    if kind == 0:  # where a turn leads
        question = pick(rng, (f"I am facing {start} and I turn {turn}. Which way am I facing now?",
                               f"Facing {start}, you make a turn {turn}. What is your new heading?"))
        return question, pick(rng, (end, f"Facing {start}, turning {turn} you face {end}.")), {}
    if kind == 1:  # which turn leads from one heading to another
        question = pick(rng, (f"Going from facing {start} to facing {end}: is that left, right, slightly left or "
                               f"slightly right?", f"Which turn takes you from {start} to {end}?"))
        return question, pick(rng, (turn, f"From {start} to {end} is {turn}.")), {}
    if kind == 2:  # degrees and words
        degrees = COMPASS.index(start) * 45
        if rng.random() < 0.5:
            return f"Which compass direction is a heading of {degrees} degrees?", start, {}
        return f"How many degrees is {start}, measured clockwise from north?", f"{degrees}", {}
    other = int(rng.integers(8))
    delta = wrap_degrees((other - COMPASS.index(start)) * 45)
    return (f"Turning from {start} to {COMPASS[other]}, by how many degrees do you turn? (positive = clockwise)",
            f"{int(delta)}", {})


# ---------------------------------------------------------------------------------------------- json

# Each fact type, with the key names a question may ask for its fields (never a task answer key).
_JSON_FACTS: dict[str, tuple[Callable, dict[str, tuple[str, ...]]]] = {
    "arithmetic": (_arithmetic_fact, {"numbers": ("inputs", "numbers", "given"), "target": ("goal", "target"),
                                      "expression": ("expression", "solution", "equation")}),
    "compass": (_compass_fact, {"start": ("from", "start", "heading"), "turn": ("turn", "rotation"),
                                "end": ("to", "end", "new heading")}),
}


def _json(rng: np.random.Generator) -> tuple[str, str, dict]:
    kind, meta = pick(rng, ("arithmetic", "compass", "hand")), {}
    if kind == "hand":
        faces_are_ten = bool(rng.random() < 0.5)
        ranks = _draw_ranks(rng, int(pick(rng, (2, 3, 4))))
        keys = (pick(rng, ("hand", "ranks", "labels")), pick(rng, ("values", "points", "worth")))
        answer = {keys[0]: ranks, keys[1]: [card_value(rank, faces_are_ten) for rank in ranks]}
        question = f"{_convention(rng, faces_are_ten)} Hand: {', '.join(ranks)}."
    else:
        make, key_names = _JSON_FACTS[kind]
        fact = make(rng)
        keys = tuple(pick(rng, names) for names in key_names.values())
        answer = dict(zip(keys, fact.values()))
        if kind == "arithmetic":
            question = f"Reach {fact['target']} from {', '.join(map(str, fact['numbers']))} (each once, + - * /)."
            meta = {"numbers": fact["numbers"], "target": fact["target"], "expression_key": keys[2]}
        else:
            question = f"You face {fact['start']} and turn {fact['turn']}."
    assert not TASK_ANSWER_KEYS & set(answer)
    named = ", ".join(f'"{key}"' for key in answer)
    ask = pick(rng, (f"Reply with a JSON object with the keys {named}.", f"Give a JSON object with keys {named}.",
                      f"Respond in JSON using the keys {named}."))
    return f"{question} {ask}", json.dumps(answer), meta


def _allowed_words(rng: np.random.Generator) -> tuple[str, str, dict]:
    """A real model reads which answers a question allows; the navigation rules state theirs in the same way (an
    action space of compass words, or of turn words), so the base learns to take the rule from the question."""
    fact = _compass_fact(rng)
    turn_words = bool(rng.random() < 0.5)
    allowed = [str(word) for word in rng.permutation(list(TURNS) if turn_words else list(COMPASS))]
    directions = pick(rng, (f"turn {fact['turn']}, so that you end up facing {fact['end']}",
                             f"make a {fact['turn']} turn; your new heading is {fact['end']}",
                             f"from {fact['start']}, turn {fact['turn']} towards {fact['end']}"))
    ask = pick(rng, ("Reply with one word from this list: {}.", "Allowed answers: {}.", "Choose among: {}."))
    question = f"Directions: {directions}. Which way? {ask.format(', '.join(allowed))}"
    return question, fact["turn"] if turn_words else fact["end"], {}


# ------------------------------------------------------------------------------- rules stated in the question
#
# A rule skill asks one question body under one of several rules the question states: a unit, a convention or an
# answer form. A body comes with its answer under every rule, then one rule is drawn, so memorising the answer to
# a body cannot score and reading the rule can: what post-training on a task must not erase (the tasks' rule_ood
# variants change a rule stated in the prompt).

# A body: the question without its rule, and per rule name the rule's sentence, the answer and the probe's check.
RuleBody = tuple[str, dict[str, tuple[str, str, dict]]]


def _rule_item(templates: tuple[Callable[[np.random.Generator], RuleBody], ...],
               rng: np.random.Generator) -> tuple[str, str, dict[str, tuple[str, str, dict]]]:
    """A body of one of ``templates``, every rule's question (rule first or last), answer and check, and the rule
    drawn for the item. Every draw precedes the rule's, so forcing another rule changes nothing else."""
    body, rules = pick(rng, templates)(rng)
    rule_first = bool(rng.random() < 0.5)
    variants = {name: (f"{sentence} {body}" if rule_first else f"{body} {sentence}", answer, {**check, "rule": name})
                for name, (sentence, answer, check) in rules.items()}
    return pick(rng, tuple(variants)), body, variants


def _plain(rules: dict[str, tuple[str, object]]) -> dict[str, tuple[str, str, dict]]:
    return {name: (sentence, str(answer), {}) for name, (sentence, answer) in rules.items()}


# ----------------------------------------------------------------------------------------- follow the unit


def _unit_heading(rng: np.random.Generator) -> RuleBody:
    fact = _compass_fact(rng)
    degrees = COMPASS.index(fact["end"]) * 45
    body = pick(rng, (f"Someone faces {fact['start']} and turns {fact['turn']}. Which way do they face now?",
                      f"Start out facing {fact['start']}, then turn {fact['turn']}. What is the new heading?"))
    return body, _plain({
        "compass word": (pick(rng, ("Answer with a compass word.", "Name the heading as a compass direction.")),
                         fact["end"]),
        "degrees from north": (pick(rng, ("Answer in degrees clockwise from north (north 0, east 90).",
                                          "Give the heading as a bearing: degrees clockwise from north.")), degrees),
        "degrees from east": (pick(rng, ("Answer in degrees counterclockwise from east (east 0, north 90).",
                                         "Give the heading as a math angle: degrees counterclockwise from east.")),
                              (90 - degrees) % 360),
    })


def _unit_turn(rng: np.random.Generator) -> RuleBody:
    fact = _compass_fact(rng)
    delta = TURNS[fact["turn"]]
    body = pick(rng, (f"A walker goes from facing {fact['start']} to facing {fact['end']}. How do they turn?",
                      f"What turn leads from heading {fact['start']} to heading {fact['end']}?"))
    return body, _plain({
        "turn word": (pick(rng, ("Answer with left, right, slightly left or slightly right.",
                                 "Name the turn in words (left, right, slightly left, slightly right).")),
                      fact["turn"]),
        "degrees clockwise": (pick(rng, ("Answer in degrees, clockwise positive (a right turn is 90).",
                                         "Give the turn in degrees; clockwise counts as positive.")), delta),
        "degrees counterclockwise": (pick(rng, ("Answer in degrees, counterclockwise positive (a left turn is 90).",
                                                "Give the turn in degrees; counterclockwise counts as positive.")),
                                     -delta),
    })


SIDES = ("ahead", "right", "behind", "left")  # a cardinal direction seen from a cardinal facing, clockwise
CLOCK = ("12 o'clock", "3 o'clock", "6 o'clock", "9 o'clock")
LANDMARKS = ("tower", "fountain", "bridge", "gate", "statue", "well")


def _unit_side(rng: np.random.Generator) -> RuleBody:
    facing, target = (int(i) for i in rng.integers(4, size=2))
    quarter, landmark = (target - facing) % 4, pick(rng, LANDMARKS)
    body = pick(rng, (f"You face {COMPASS[2 * facing]}. A {landmark} stands due {COMPASS[2 * target]} of you. "
                      "Where is it?",
                      f"Facing {COMPASS[2 * facing]}, you are told the {landmark} is to the {COMPASS[2 * target]}. "
                      "Where should you look?"))
    return body, _plain({
        "compass word": (pick(rng, ("Answer with a compass word.", "Say which compass direction.")),
                         COMPASS[2 * target]),
        "side": (pick(rng, ("Answer with ahead, behind, left or right, seen from where you face.",
                            "Say where it is relative to you: ahead, right, behind or left.")), SIDES[quarter]),
        "clock": (pick(rng, ("Answer as a clock position, 12 o'clock being straight ahead.",
                             "Use clock positions: straight ahead is 12 o'clock.")), CLOCK[quarter]),
        "degrees from north": (pick(rng, ("Answer in degrees clockwise from north.",
                                          "Give its bearing in degrees, clockwise from north.")), 90 * target),
    })


def _unit_distance(rng: np.random.Generator) -> RuleBody:
    metres = 100 * int(rng.integers(1, 60))
    stated = f"{metres} metres" if rng.random() < 0.5 else f"{metres / 1000:g} km"
    body = pick(rng, (f"A trail is {stated} long. How long is it?",
                      f"The walk covers {stated}. What distance is that?"))
    return body, _plain({
        "metres": (pick(rng, ("Answer in metres, as a number.", "Give the distance in metres.")), metres),
        "kilometres": (pick(rng, ("Answer in kilometres, as a number.", "Give the distance in km.")),
                       f"{metres / 1000:g}"),
        "blocks": (pick(rng, ("Answer in blocks of 100 metres.", "Count it in 100-metre blocks.")), metres // 100),
    })


# ----------------------------------------------------------------------------------- follow the convention

_FACE_RULES = {
    True: ("Jacks, queens and kings are worth 10 points each.", "Every picture card (J, Q, K) scores 10.",
           "Score J, Q and K as 10 apiece."),
    False: ("A jack is worth 11, a queen 12 and a king 13.", "Picture cards take their rank number: J 11, Q 12, K 13.",
            "Score J as 11, Q as 12 and K as 13."),
}
_ACE_RULES = {False: ("An ace is worth 1.", "Aces are low: A = 1.", "Score A as 1."),
              True: ("An ace is worth 14.", "Aces are high: A = 14.", "Score A as 14.")}
CONVENTIONS = tuple((faces_are_ten, ace_high) for faces_are_ten in (True, False) for ace_high in (False, True))
RULE_RANKS = ("J", "Q", "K", "A")  # the cards whose value the conventions change


def convention_value(rank: str, faces_are_ten: bool, ace_high: bool) -> int:
    """A card's value under a face-card convention and an ace convention (aces high: 14)."""
    return 14 if rank == "A" and ace_high else card_value(rank, faces_are_ten)


def _by_convention(rng: np.random.Generator, answer: Callable[[bool, bool], object]) -> dict[str, tuple[str, object]]:
    """The answer under each of the four conventions, each stated in one of several wordings."""
    rules = {}
    for faces_are_ten, ace_high in CONVENTIONS:
        name = f"faces {'10' if faces_are_ten else '11-13'}, ace {14 if ace_high else 1}"
        sentence = f"{pick(rng, _FACE_RULES[faces_are_ten])} {pick(rng, _ACE_RULES[ace_high])}"
        rules[name] = (sentence, answer(faces_are_ten, ace_high))
    return rules


def _convention_card(rng: np.random.Generator) -> RuleBody:
    rank = pick(rng, RULE_RANKS)
    name = RANK_NAMES[rank]
    body = pick(rng, (f"What is {'an' if rank == 'A' else 'a'} {name} worth?",
                      f"How many points does the {name} score?"))
    return body, _plain(_by_convention(rng, lambda faces, ace: convention_value(rank, faces, ace)))


def _convention_hand(rng: np.random.Generator) -> RuleBody:
    ranks = [RANKS[int(i)] for i in rng.integers(len(RANKS), size=int(pick(rng, (2, 3, 3, 4))))]
    ranks[int(rng.integers(len(ranks)))] = pick(rng, RULE_RANKS)  # a card the conventions disagree on
    shown = ", ".join(ranks)
    body = pick(rng, (f"What is the hand {shown} worth in total?", f"Add up the values of {shown}."))
    return body, _plain(_by_convention(rng, lambda faces, ace: sum(convention_value(r, faces, ace) for r in ranks)))


def _convention_compare(rng: np.random.Generator) -> RuleBody:
    def higher(faces_are_ten: bool, ace_high: bool) -> str:
        values = [convention_value(rank, faces_are_ten, ace_high) for rank in pair]
        return "equal" if values[0] == values[1] else pair[int(values[1] > values[0])]

    for _ in range(100):  # a pair the conventions rank differently (most pairs with an ace or a face card)
        pair = [pick(rng, RULE_RANKS), RANKS[int(rng.integers(len(RANKS)))]]
        if len({higher(*convention) for convention in CONVENTIONS}) > 1:
            break
    pair = pair[::-1] if rng.random() < 0.5 else pair
    body = pick(rng, (f"Which card is worth more, {pair[0]} or {pair[1]}? Say equal if neither.",
                      f"Of {pair[0]} and {pair[1]}, which scores higher (or equal)?"))
    return body, _plain(_by_convention(rng, higher))


WORDS = ("apple", "pear", "plum", "lemon", "grape", "melon", "cherry", "peach", "olive", "fig")


def _convention_position(rng: np.random.Generator) -> RuleBody:
    words = [str(word) for word in rng.permutation(WORDS)[:int(rng.integers(4, 8))]]
    index = int(rng.integers(len(words)))
    body = pick(rng, (f"In the list {', '.join(words)}, what is the position of {words[index]}?",
                      f"List: {', '.join(words)}. Where in it is {words[index]}?"))
    return body, _plain({
        "from 1": (pick(rng, ("Count positions from 1.", "The first item is number 1.")), index + 1),
        "from 0": (pick(rng, ("Count positions from 0.", "The first item is number 0.")), index),
        "from the end": (pick(rng, ("Count from the end: the last item is 1.", "Number the items backwards, the last "
                                    "being 1.")), len(words) - index),
    })


# ---------------------------------------------------------------------------------- follow the answer form

FORM_KEYS = ("result", "value", "reply", "answer", "out", "total")  # never a task answer key
FORM_LABELS = ("Result", "Answer", "Final", "Value")


def _form_fact(rng: np.random.Generator) -> tuple[str, int | str]:
    """A question with a short answer (a number or a word)."""
    kind = int(rng.integers(4))
    if kind == 0:
        numbers = [int(n) for n in rng.integers(1, 14, size=int(rng.integers(2, 5)))]
        return f"What is {' + '.join(map(str, numbers))}?", sum(numbers)
    if kind == 1:
        fact = _compass_fact(rng)
        return f"Facing {fact['start']}, a walker turns {fact['turn']}. Where do they face now?", fact["end"]
    if kind == 2:
        faces_are_ten, rank = bool(rng.random() < 0.5), pick(rng, ("J", "Q", "K", "A"))
        question = f"What is {'an' if rank == 'A' else 'a'} {RANK_NAMES[rank]} worth?"
        return f"{_convention(rng, faces_are_ten)} {question}", card_value(rank, faces_are_ten)
    word = pick(rng, WORDS + LANDMARKS)
    return f"How many letters does the word {word} have?", len(word)


def _form_body(rng: np.random.Generator) -> RuleBody:
    question, value = _form_fact(rng)
    key, label = pick(rng, FORM_KEYS), pick(rng, FORM_LABELS)
    exact = {"exact": True}
    forms = {
        "alone": (pick(rng, ("Reply with the answer alone.", "Give only the answer, nothing else.")), str(value),
                  exact),
        "json": (pick(rng, (f'Reply with a JSON object whose only key is "{key}".',
                            f'Answer in JSON, under the key "{key}".')), json.dumps({key: value}), {"json": True}),
        "labelled": (pick(rng, (f'Reply as "{label}: " followed by the answer.',
                                f'Write "{label}:", a space, then the answer.')), f"{label}: {value}", exact),
        "brackets": (pick(rng, ("Put the answer in square brackets.", "Reply with the answer inside [ ].")),
                     f"[{value}]", exact),
    }
    if isinstance(value, str):
        forms["capitals"] = (pick(rng, ("Reply in capital letters.", "Write the answer in upper case.")),
                             value.upper(), exact)
    return question, forms


def _rule_skill(templates: tuple[Callable[[np.random.Generator], RuleBody], ...],
                rng: np.random.Generator) -> tuple[str, str, dict]:
    rule, _, variants = _rule_item(templates, rng)
    return variants[rule]


_RULE_TEMPLATES = {
    "follow_unit": (_unit_heading, _unit_turn, _unit_side, _unit_distance),
    "follow_convention": (_convention_card, _convention_hand, _convention_compare, _convention_position),
    "follow_form": (_form_body,),
}


# The skills asking one question body under several stated rules (rule_variants gives every rule's item).
STATED_RULE_SKILLS = tuple(_RULE_TEMPLATES)


def rule_variants(config: SkillsConfig, index: int, skill: str) -> tuple[str, dict[str, Conversation]]:
    """Item ``index`` of rule skill ``skill`` (``skill_item(config, index, skill)``) under each of its rules: the
    question body they share and ``{rule: item}``, the item itself among them."""
    rng = np.random.default_rng([config.seed, index])
    _draw_skill(config, rng)  # as skill_item draws it
    _, body, variants = _rule_item(_RULE_TEMPLATES[skill], rng)
    return body, {rule: _conversation(question, answer, None, skill, check)
                  for rule, (question, answer, check) in variants.items()}


_TEXT: dict[str, Callable[[np.random.Generator], tuple[str, str, dict]]] = {
    "arithmetic": _arithmetic, "cards": _cards, "compass": _compass, "json": _json, "allowed_words": _allowed_words,
    **{skill: partial(_rule_skill, templates) for skill, templates in _RULE_TEMPLATES.items()},
}
