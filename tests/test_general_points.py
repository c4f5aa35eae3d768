"""GeneralPoints (docs/spec.md §1): dealing, judging, revision, the expert, the solver, rendering, gymnasium API."""

from __future__ import annotations

import functools
import itertools
import json
import math
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from hypothesis import given, settings
from hypothesis import strategies as st

import lit_sftrl  # noqa: F401  (registers the environments)
from lit_sftrl.envs import solver
from lit_sftrl.envs.arithmetic import evaluate_formula
from lit_sftrl.envs.base import REVISION_PREFIX
from lit_sftrl.envs.cards import RANKS, SUIT_GROUPS, Card, draw_hand, render_table
from lit_sftrl.envs.general_points import DEFAULT_REWARDS, FACE_RANKS, GeneralPointsEnv, card_values

VARIANTS = [
    dict(face_card_rule=rule, suits=suits) for rule in ("10", "11-13") for suits in ("black", "red", "all")
]
# 3 3 8 8 has a single, fractional solution: 8/(3-8/3).
HAND_3388 = [("3", "spades"), ("8", "spades"), ("3", "clubs"), ("8", "clubs")]
LABELS_3388 = ["3", "8", "3", "8"]


def answer(formula: Any, cards: Any = LABELS_3388, **extra: Any) -> str:
    return json.dumps({"cards": cards, "number": [3, 8, 3, 8], "formula": formula, **extra})


def env_3388(**kwargs: Any) -> GeneralPointsEnv:
    env = GeneralPointsEnv(**kwargs)
    env.reset(seed=0, options={"hand": HAND_3388})
    return env


# -- construction -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        (dict(face_card_rule="12"), "face_card_rule"),
        (dict(suits="green"), "suits"),
        (dict(modality="audio"), "modality"),
        (dict(target=0), "target"),
        (dict(target=True), "target"),
        (dict(num_cards=7), "num_cards"),
        (dict(num_cards=4.0), "num_cards"),
        (dict(verify_iter=0), "verify_iter"),
        (dict(image_size=16), "image_size"),
        (dict(rewards={"partial": 1.0}), "rewards"),
        (dict(rewards={"success": "high"}), "rewards"),
        (dict(rewards=[("success", 1.0)]), "rewards"),
    ],
)
def test_invalid_arguments_are_rejected_by_name(kwargs: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        GeneralPointsEnv(**kwargs)


def test_invalid_choice_lists_allowed_values() -> None:
    with pytest.raises(ValueError, match="'black', 'red', 'all'"):
        GeneralPointsEnv(suits="green")


def test_registered_with_gymnasium() -> None:
    env = gym.make("lit_sftrl/GeneralPoints-v0", modality="image", image_size=128, face_card_rule="11-13")
    obs, info = env.reset(seed=3)
    assert isinstance(env.unwrapped, GeneralPointsEnv)
    assert obs["image"].shape == (128, 128, 3) and any(rank in FACE_RANKS for rank in info["cards"])


def test_importing_the_env_does_not_import_torch() -> None:
    code = "import sys, lit_sftrl.envs.general_points; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- dealing ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", ["iid", "deck"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v['face_card_rule']}-{v['suits']}")
def test_hands_follow_the_spec(variant: dict, sampling: str) -> None:
    env = GeneralPointsEnv(**variant, sampling=sampling)
    values, allowed_suits = card_values(variant["face_card_rule"]), set(SUIT_GROUPS[variant["suits"]])
    hands = set()
    for seed in range(300):
        env.reset(seed=seed)
        hand = env.hand
        hands.add(hand)
        assert len(hand) == 4 and {card.suit for card in hand} <= allowed_suits
        assert len(set(hand)) == 4 or sampling == "iid"  # only the deck deals distinct cards
        assert env.numbers == [values[card.rank] for card in hand]
        assert solver.is_solvable(tuple(sorted(env.numbers)), 24)
        if variant["face_card_rule"] == "11-13":
            assert any(card.rank in FACE_RANKS for card in hand)
    assert len(hands) > 250  # different seeds, different hands


def test_draw_hand_is_uniform_over_ordered_hands() -> None:
    rng = np.random.default_rng(0)
    cards = [Card(rank, "spades") for rank in RANKS[:5]]
    counts = Counter(draw_hand(cards, 2, rng) for _ in range(20_000))
    assert len(counts) == 20 and all(len(set(hand)) == 2 for hand in counts)
    expected = 20_000 / 20
    chi_square = sum((observed - expected) ** 2 / expected for observed in counts.values())
    assert chi_square < 50  # 19 degrees of freedom: p < 1e-4 for a fair draw to exceed this


def test_face_rule_values() -> None:
    assert [card_values("10")[r] for r in ("A", "7", "10", "J", "Q", "K")] == [1, 7, 10, 10, 10, 10]
    assert [card_values("11-13")[r] for r in ("A", "7", "10", "J", "Q", "K")] == [1, 7, 10, 11, 12, 13]


def test_reset_is_deterministic_per_seed() -> None:
    first, second = GeneralPointsEnv(modality="image"), GeneralPointsEnv(modality="image")
    obs_a, info_a = first.reset(seed=123)
    first.reset(seed=5)
    obs_b, info_b = second.reset(seed=123)
    obs_c, _ = first.reset(seed=123)
    assert info_a["cards"] == info_b["cards"] and first.hand == second.hand
    assert obs_a["image"].tobytes() == obs_b["image"].tobytes() == obs_c["image"].tobytes()
    assert obs_a["messages"] == obs_b["messages"]


def test_reset_does_not_search(monkeypatch: pytest.MonkeyPatch) -> None:
    env = GeneralPointsEnv(face_card_rule="11-13", suits="all")
    env.reset(seed=0)  # builds the table once per process

    def no_search(*args: Any) -> bool:
        raise AssertionError("reset searched for a solution")

    monkeypatch.setattr(solver, "_solvable", no_search)
    monkeypatch.setattr(solver, "_reachable", no_search)
    for seed in range(200):
        env.reset(seed=seed)


def test_chosen_hand_must_be_legal() -> None:
    env = GeneralPointsEnv(suits="black", sampling="deck")
    for bad in ([("3", "hearts")] + HAND_3388[1:], HAND_3388[:3], [HAND_3388[0]] * 4, [("1", "spades")] * 4):
        with pytest.raises(ValueError, match="options"):
            env.reset(options={"hand": bad})
    iid = GeneralPointsEnv(suits="black")  # drawing with replacement can deal one card twice: 3*3*3-3
    assert iid.reset(options={"hand": [HAND_3388[0]] * 4})[1]["cards"] == ["3"] * 4
    with pytest.raises(ValueError, match="make 24"):  # 1 1 1 1 cannot make 24
        env.reset(options={"hand": [("A", "spades"), ("A", "clubs"), ("2", "spades"), ("2", "clubs")]})


# -- prompts ------------------------------------------------------------------------------------------------


def test_prompt_states_target_rule_format_and_cards_only_in_text() -> None:
    text = env_3388()._observation()["messages"][0]["content"]
    observation, info = GeneralPointsEnv(modality="image", face_card_rule="11-13", target=10).reset(seed=0)
    image_prompt = observation["messages"][0]["content"]
    assert "'3', '8', '3', '8'" in text and "evaluates to 24" in text and "count as 10" in text
    assert "evaluates to 10" in image_prompt and "11, 12 and 13" in image_prompt
    assert not any(f"'{label}'" in image_prompt for label in info["cards"] if label not in FACE_RANKS | {"A"})
    for prompt in (text, image_prompt):
        assert all(f'"{key}"' in prompt for key in ("cards", "number", "formula"))
        assert prompt.isascii()


# -- rewards, in docs/spec.md §1 order ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        answer("8/(3-8/3)"),
        answer("8 / ( 3 - 8 / 3 )"),
        answer("8/(3-8/3) = 24"),
        answer("8/(3-8/3)=24", cards=["8", "3", "8", "3"]),
        "```json\n" + answer("8/(3-8/3)") + "\n```",
        "Sure! Here it is:\n```\n" + answer("8/(3-8/3)") + "\n```\nGood luck.",
        "{'cards': ['3', '8', '3', '8'], 'number': [3, 8, 3, 8], 'formula': '8/(3-8/3) = 24'}",
        'My answer: {"Formula ": "8/(3-8/3)", "CARDS": ["3", "8", "3", "8"]} done',
    ],
)
@pytest.mark.parametrize("modality", ["text", "image"])
def test_solutions_earn_success(text: str, modality: str) -> None:
    env = env_3388(modality=modality)
    _, reward, terminated, truncated, info = env.step(text)
    assert (reward, terminated, truncated) == (5.0, True, False)
    assert info["success"] and info["correct"] and info["feedback"] is None and info["outcome"] == "success"
    assert info["recognized"] is (True if modality == "image" else None)


@pytest.mark.parametrize(
    ("text", "outcome", "gist"),
    [
        ("I think the answer is 24.", "illegal", "no JSON object"),
        ("x" * 10_000, "illegal", "longer than"),
        (json.dumps({"cards": LABELS_3388, "number": [3, 8, 3, 8]}), "illegal", "no 'formula'"),
        (answer("8/(3-8/3"), "illegal", "well-formed"),
        (answer("8 x (3 - 8 / 3)"), "illegal", "illegal characters 'x'"),
        (answer("__import__('os').system('echo pwned')"), "illegal", "illegal characters"),
        (answer("8/(3-3)*8+3"), "illegal", "divides by zero"),
        (answer("8/(3-8/3)=25"), "illegal", "'= 24'"),
        (answer(24), "illegal", "must be a string"),
        (answer("-8/(8/3-3)"), "illegal", "unary"),
        (answer("8*3"), "wrong_numbers", "leaves out 3 and 8"),
        (answer("8*3+3-3+8-8"), "wrong_numbers", "uses 3 and 8, which the cards do not provide"),
        (answer("24"), "wrong_numbers", "uses 24, which the cards do not provide, and it leaves out 3, 3, 8 and 8"),
        (answer("8+3+8+3"), "wrong_value", "evaluates to 22, not 24"),
        (answer("8/3+8/3 = 24"), "wrong_value", "evaluates to 16/3, not 24"),
        (answer("8*3/(8*3)"), "wrong_value", "evaluates to 1, not 24"),
        (answer("8/(3+8/3)"), "wrong_value", "evaluates to 24/17, not 24"),
    ],
)
def test_failures_get_the_first_failing_check(text: str, outcome: str, gist: str) -> None:
    env = env_3388()
    _, reward, terminated, truncated, info = env.step(text)
    assert info["outcome"] == outcome and reward == DEFAULT_REWARDS[outcome]
    assert not terminated and not truncated and not info["success"] and not info["correct"]
    assert gist in info["feedback"], info["feedback"]


@pytest.mark.parametrize("action", [None, 24, b'{"formula": "8/(3-8/3)"}', {"formula": "8/(3-8/3)"}])
def test_non_text_actions_are_malformed(action: Any) -> None:
    _, reward, _, _, info = env_3388(modality="image").step(action)
    assert reward == DEFAULT_REWARDS["illegal"] == -3 and info["recognized"] is False


@pytest.mark.parametrize(
    ("cards", "formula", "outcome"),
    [
        (["3", "8", "3", "9"], "8/(3-8/3)", "misread"),  # misread beats a right formula
        (["3", "8", "3"], "8/(3-8/3", "misread"),  # and is checked before the formula
        (None, "8/(3-8/3)", "misread"),
        ("3, 8, 3, 8", "8/(3-8/3)", "misread"),
        ([" 3", 8, "3 ", "8"], "8/(3-8/3", "illegal"),  # spelled loosely, still the right cards
        (["8", "8", "3", "3"], "8+8+3+3", "wrong_value"),
    ],
)
def test_image_modality_checks_the_cards_first(cards: Any, formula: str, outcome: str) -> None:
    env = env_3388(modality="image")
    _, reward, _, _, info = env.step(answer(formula, cards=cards))
    assert info["outcome"] == outcome and reward == DEFAULT_REWARDS[outcome]
    assert info["recognized"] is (outcome != "misread")
    if outcome == "misread":
        assert "misread" in info["feedback"] and "8" not in info["feedback"]  # the feedback does not tell


def test_text_modality_ignores_the_stated_cards() -> None:
    _, reward, *_ = env_3388().step(answer("8/(3-8/3)", cards=["K"]))
    assert reward == 5.0


def test_reward_table_is_configurable_and_has_no_partial_reward() -> None:
    assert dict(DEFAULT_REWARDS) == {
        "misread": -1.5, "illegal": -3.0, "wrong_numbers": -2.0, "success": 5.0, "wrong_value": -1.0,
        "budget_exhausted": -1.0,
    }
    env = env_3388(rewards={"success": 1, "wrong_value": 0.0})
    assert env.step(answer("8+3+8+3"))[1] == 0.0 and env.step(answer("8/(3-8/3)"))[1] == 1.0


# -- revision and budget ------------------------------------------------------------------------------------


def test_failed_attempts_continue_the_conversation_until_the_budget_is_spent() -> None:
    env = env_3388(verify_iter=3, modality="image")
    first = env._observation()
    wrong = [answer("8+3+8+3"), "nonsense", answer("8*3")]
    for attempt, text in enumerate(wrong, start=1):
        obs, reward, terminated, truncated, info = env.step(text)
        # The budget's end is a terminal (the paper's MDP), its verdict carrying the budget penalty.
        assert info["attempt"] == attempt and not truncated and terminated == info["budget_exhausted"] == (attempt == 3)
        assert reward == DEFAULT_REWARDS[info["outcome"]] + (DEFAULT_REWARDS["budget_exhausted"] if attempt == 3 else 0)
        assert obs["messages"][0] == first["messages"][0] and len(obs["messages"]) == 1 + 2 * attempt
        assert obs["messages"][-2] == {"role": "assistant", "content": text}
        assert obs["messages"][-1] == {"role": "user", "content": REVISION_PREFIX + info["feedback"]}
        assert np.array_equal(obs["image"], first["image"])
    assert obs["messages"][2]["content"] == "You failed this trial because your formula evaluates to 22, not 24."
    with pytest.raises(RuntimeError, match="reset"):
        env.step(answer("8/(3-8/3)"))


def test_success_after_a_revision_ends_the_episode() -> None:
    env = env_3388()
    env.step(answer("8+3+8+3"))
    _, reward, terminated, truncated, info = env.step(answer("8/(3-8/3)"))
    assert (reward, terminated, truncated, info["attempt"], info["success"]) == (5.0, True, False, 2, True)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(answer("8/(3-8/3)"))


def test_single_turn_budget_and_step_before_reset() -> None:
    with pytest.raises(RuntimeError, match="reset"):
        GeneralPointsEnv().step(answer("8/(3-8/3)"))
    env = env_3388(verify_iter=1)
    _, reward, terminated, truncated, info = env.step("nonsense")
    assert (reward, terminated, truncated, info["budget_exhausted"], info["well_formed"]) == (
        -4.0, True, False, True, False
    )
    env = env_3388(verify_iter=1, rewards={"budget_exhausted": -0.5})
    assert env.step(answer("8+3+8+3"))[1] == -1.5


# -- the expert ---------------------------------------------------------------------------------------------


def _expert_episodes(variant: dict, seeds: range, **kwargs: Any) -> Iterator[tuple[GeneralPointsEnv, dict]]:
    env = GeneralPointsEnv(**variant, **kwargs)
    for seed in seeds:
        env.reset(seed=seed)
        yield env, env.step(env.expert_answer())[4]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v['face_card_rule']}-{v['suits']}")
def test_expert_always_succeeds(variant: dict) -> None:
    for _, info in _expert_episodes(variant, range(2000)):
        assert info["outcome"] == "success", info
    for _, info in _expert_episodes(variant, range(150), modality="image"):
        assert info["outcome"] == "success" and info["recognized"], info


def test_expert_answers_are_seeded_and_varied() -> None:
    def answers(seed: int) -> list[str]:
        env = env_3388()
        env.reset(seed=seed, options={"hand": [("A", "spades"), ("2", "spades"), ("3", "spades"), ("4", "spades")]})
        return [env.expert_answer() for _ in range(20)]

    assert answers(1) == answers(1) and len(set(answers(1))) > 5
    parsed = json.loads(answers(1)[0])
    assert parsed["cards"] == ["A", "2", "3", "4"] and parsed["number"] == [1, 2, 3, 4]
    assert parsed["formula"].endswith("=24")


@pytest.mark.parametrize("variant", VARIANTS[::2], ids=lambda v: f"{v['face_card_rule']}-{v['suits']}")
def test_suboptimal_answer_fails_plausibly_then_expert_recovers(variant: dict) -> None:
    env = GeneralPointsEnv(**variant, modality="image")
    for seed in range(200):
        env.reset(seed=seed)
        _, reward, _, _, info = env.step(env.suboptimal_answer())
        assert info["outcome"] in ("wrong_value", "wrong_numbers") and info["recognized"]
        assert env.step(env.expert_answer())[4]["success"]


# -- the solver against an independent brute force ----------------------------------------------------------


def _pair_ops(a: int, b: int, c: int, d: int) -> Iterator[tuple[int, int]]:
    """(a/b) op (c/d) as unnormalised integer pairs, for + - * / (no division by zero)."""
    yield a * d + c * b, b * d
    yield a * d - c * b, b * d
    yield a * c, b * d
    if c:
        yield a * d, b * c


@functools.cache
def _sequence_values(sequence: tuple[int, ...]) -> frozenset[tuple[int, int]]:
    """Every value of every expression tree whose leaves are ``sequence`` in this order."""
    if len(sequence) == 1:
        return frozenset({(sequence[0], 1)})
    found = set()
    for cut in range(1, len(sequence)):
        for a, b in _sequence_values(sequence[:cut]):
            for c, d in _sequence_values(sequence[cut:]):
                for numerator, denominator in _pair_ops(a, b, c, d):
                    divisor = math.gcd(numerator, denominator) * (1 if denominator > 0 else -1)
                    found.add((numerator // divisor, denominator // divisor))
    return frozenset(found)


@functools.cache
def brute_force_solvable(values: tuple[int, ...], target: int) -> bool:
    """Trees over every ordering of the values, in integer-pair arithmetic: shares nothing with the solver."""
    for sequence in set(itertools.permutations(values)):
        for cut in range(1, len(sequence)):
            for a, b in _sequence_values(sequence[:cut]):
                for c, d in _sequence_values(sequence[cut:]):
                    if any(n == target * m for n, m in _pair_ops(a, b, c, d)):
                        return True
    return False


@pytest.mark.parametrize("rule", ["10", "11-13"])
def test_solver_agrees_with_brute_force_on_every_rank_multiset(rule: str) -> None:
    values = card_values(rule)
    rank_multisets = list(itertools.combinations_with_replacement(RANKS, 4))
    assert len(rank_multisets) == 1820
    for ranks in rank_multisets:
        hand = tuple(sorted(values[rank] for rank in ranks))
        assert solver.is_solvable(hand, 24) == brute_force_solvable(hand, 24), ranks


def test_known_counts() -> None:
    solvable = [m for m in solver.multisets(4) if solver.is_solvable(m, 24)]
    assert len(solvable) == 1362  # the classic count for ranks 1..13
    assert not solver.is_solvable((1, 1, 1, 1), 24) and solver.solutions((3, 3, 8, 8), 24) == ("8/(3-8/3)",)


@pytest.mark.parametrize(("num_cards", "target"), [(3, 24), (3, 10), (4, 10), (4, 36)])
def test_solver_other_sizes_and_targets(num_cards: int, target: int) -> None:
    for hand in itertools.islice(solver.multisets(num_cards), 0, None, 1 if num_cards == 3 else 5):
        assert solver.is_solvable(hand, target) == brute_force_solvable(hand, target), hand


def test_solver_five_cards_is_memoised_on_demand() -> None:
    for hand in [(1, 1, 1, 1, 1), (1, 2, 3, 4, 5), (13, 13, 13, 13, 13), (1, 1, 1, 1, 2), (7, 9, 11, 12, 13)]:
        assert solver.is_solvable(hand, 24) == brute_force_solvable(hand, 24), hand
    env = GeneralPointsEnv(num_cards=5, suits="all")
    env.reset(seed=0)
    assert env.step(env.expert_answer())[1] == 5.0


def test_every_listed_solution_is_a_distinct_accepted_formula() -> None:
    for hand in itertools.islice(solver.multisets(4), 0, None, 9):
        found = solver.solutions(hand, 24)
        assert bool(found) == solver.is_solvable(hand, 24) and len(set(found)) == len(found)
        for formula in found:
            evaluation = evaluate_formula(formula, 24)
            assert evaluation.value == 24 and sorted(evaluation.numbers) == list(hand), formula


# -- rendering ----------------------------------------------------------------------------------------------


def _red_pixels(image: np.ndarray) -> int:
    red, green, blue = (image[..., i].astype(int) for i in range(3))
    return int(((red > 150) & (green < 90) & (blue < 90)).sum())


def test_red_suits_are_red_and_black_suits_are_not() -> None:
    reds = [GeneralPointsEnv(modality="image", suits="red").reset(seed=s)[0]["image"] for s in range(5)]
    blacks = [GeneralPointsEnv(modality="image", suits="black").reset(seed=s)[0]["image"] for s in range(5)]
    assert min(map(_red_pixels, reds)) > 200 and max(map(_red_pixels, blacks)) == 0


def test_every_card_renders_distinctly_at_224px() -> None:
    cards = [Card(rank, suit) for suit in SUIT_GROUPS["all"] for rank in RANKS]
    images = {render_table([card] * 4, 224).tobytes() for card in cards}
    assert len(images) == 52
    image = render_table(cards[:4], 224)
    assert image.shape == (224, 224, 3) and image.dtype == np.uint8
    assert render_table(cards[:4], 224).tobytes() == image.tobytes()


# -- properties and the gymnasium checker -------------------------------------------------------------------

_formulas = st.text(alphabet="0123456789+-*/() =.x", max_size=40)
_answers = st.one_of(
    st.text(max_size=200),
    st.builds(lambda f, c: answer(f, cards=c), _formulas, st.lists(st.sampled_from(RANKS + ("1", "Z")), max_size=5)),
    st.builds(lambda f: f"```json\n{{'formula': {f!r}}}\n```", _formulas),
    st.builds(lambda n: "[" * n + "{" * n + "}" * n + "]" * n, st.integers(0, 3000)),
    st.recursive(
        st.none() | st.integers() | st.text(max_size=5),
        lambda children: st.lists(children) | st.dictionaries(st.text(max_size=5), children),
    ).map(json.dumps),
)


@settings(max_examples=300, deadline=None)
@given(texts=st.lists(_answers, min_size=1, max_size=4), modality=st.sampled_from(["text", "image"]))
def test_step_never_raises_and_rewards_come_from_the_table(texts: list[str], modality: str) -> None:
    env = GeneralPointsEnv(modality=modality, verify_iter=3)
    env.reset(seed=len(texts))
    for text in texts:
        _, reward, terminated, truncated, info = env.step(text)
        penalty = DEFAULT_REWARDS["budget_exhausted"] if info["budget_exhausted"] else 0.0
        assert reward == DEFAULT_REWARDS[info["outcome"]] + penalty and not truncated
        assert {"cards", "numbers", "success", "correct", "recognized", "feedback", "attempt", "well_formed",
                "budget_exhausted"} <= set(info)
        if terminated or truncated:
            env.reset()


@pytest.mark.parametrize("modality", ["text", "image"])
def test_gymnasium_env_checker(modality: str) -> None:
    """Every check passes (seeding determinism, fresh data per call, sampled text actions); rendering is
    skipped because the env has no render modes."""
    check_env(GeneralPointsEnv(modality=modality), skip_render_check=True)
