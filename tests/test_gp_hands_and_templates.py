"""GeneralPoints as the paper ran it: the original code's hands (i.i.d. with replacement) vs the deck option,
the original answer layout, and replaceable prompt/feedback templates."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter

import pytest

from lit_sftrl.envs.cards import RANKS, deck
from lit_sftrl.envs.general_points import DEFAULT_TEMPLATES, FACE_RANKS, GeneralPointsEnv, card_values
from lit_sftrl.envs.solver import is_solvable

HAND_3388 = [("3", "spades"), ("8", "spades"), ("3", "clubs"), ("8", "clubs")]
SAMPLES = 3000


def _stats(hands: Counter, rule: str) -> dict[str, float]:
    """Over solvable rank multisets (weighted): mean J/Q/K per hand, share with >= 2 faces, share with a
    repeated rank."""
    values = card_values(rule)
    total = faces = two_faces = repeated = 0.0
    for labels, weight in hands.items():
        if not is_solvable(tuple(sorted(values[label] for label in labels)), 24):
            continue
        count = sum(label in FACE_RANKS for label in labels)
        total += weight
        faces, two_faces = faces + weight * count, two_faces + weight * (count >= 2)
        repeated += weight * (len(set(labels)) < len(labels))
    return {"faces": faces / total, "two_faces": two_faces / total, "repeated": repeated / total}


def _exact(sampling: str, rule: str) -> dict[str, float]:
    """Exact enumeration of each sampler's rank multisets, before the solvability filter."""
    hands: Counter = Counter()
    if sampling == "iid" and rule == "10":
        for ranks in itertools.product(RANKS, repeat=4):
            hands[tuple(sorted(ranks))] += 1
    elif sampling == "iid":  # three free ranks and one forced J/Q/K (the shuffle does not change the multiset)
        for ranks in itertools.product(RANKS, repeat=3):
            for face in "JQK":
                hands[tuple(sorted((*ranks, face)))] += 1
    else:
        for cards in itertools.combinations(deck("black"), 4):
            labels = tuple(sorted(card.rank for card in cards))
            if rule == "10" or not FACE_RANKS.isdisjoint(labels):
                hands[labels] += 1
    return _stats(hands, rule)


# The documented numbers (README, issue 13): the original's iid rule_ood test is the harder one.
DOCUMENTED = {
    ("iid", "11-13"): {"faces": 1.62, "two_faces": 0.50}, ("deck", "11-13"): {"faces": 1.32, "two_faces": 0.29},
    ("iid", "10"): {"repeated": 0.345}, ("deck", "10"): {"repeated": 0.20},
}


@pytest.mark.parametrize(("sampling", "rule"), list(DOCUMENTED))
def test_hand_statistics_match_each_sampler_within_sampling_error(sampling: str, rule: str) -> None:
    exact = _exact(sampling, rule)
    for key, documented in DOCUMENTED[(sampling, rule)].items():
        assert exact[key] == pytest.approx(documented, abs=0.006), (key, exact)
    env = GeneralPointsEnv(face_card_rule=rule, sampling=sampling)
    hands = Counter()
    for seed in range(SAMPLES):
        env.reset(seed=seed)
        hands[tuple(sorted(env.labels))] += 1
    sampled = _stats(hands, rule)  # every dealt hand is solvable: the filter keeps them all
    for key, expected in exact.items():
        spread = 2.0 if key == "faces" else 1.0  # faces per hand: a count in 1..4, its sd is below 1
        stderr = spread * math.sqrt(max(expected * (1 - expected), 0.25) / SAMPLES)
        assert abs(sampled[key] - expected) < 4 * stderr, (key, sampled[key], expected)


def test_rule_ood_iid_hands_put_the_forced_face_anywhere() -> None:
    env = GeneralPointsEnv(face_card_rule="11-13")
    positions = Counter()
    for seed in range(400):
        env.reset(seed=seed)
        labels = env.labels
        assert any(label in FACE_RANKS for label in labels)
        positions.update(i for i, label in enumerate(labels) if label in FACE_RANKS)
    assert len(positions) == 4 and min(positions.values()) > 100


def test_the_original_answer_layout_is_accepted() -> None:
    """Single-quoted Python lists, trailing commas, a leading newline: the released SFT answers' layout."""
    env = GeneralPointsEnv(modality="image")
    env.reset(seed=0, options={"hand": HAND_3388})
    original = (
        "\n{\n  \"cards\": ['3', '8', '3', '8'],\n  \"number\": [3, 8, 3, 8],\n  \"formula\": \"8/(3-8/3)=24\",\n}"
    )
    _, reward, terminated, _, info = env.step(original)
    assert (reward, terminated, info["well_formed"], info["recognized"]) == (5.0, True, True, True)


ORIGINAL_STYLE = (
    "[Task Description]\nYou are an expert {target_number} points card game player. You will receive a set of "
    "{num_cards} cards.\nNote that {face_card_msg}, and each card must be used once.\n\n[Input]\nCards: [{cards}]\n\n"
    "[Output]\n{{\n  \"cards\": [x, y, z, w], where {face_card_msg},\n  \"formula\": 'an equation that equals "
    "{target_number}',\n}}"
)


def test_a_template_override_changes_the_prompt_and_the_env_still_judges() -> None:
    templates = {
        "prompt": ORIGINAL_STYLE,
        "face_card_rule_10": "'J', 'Q', and 'K' count as '10'.",
        "feedback_wrong_value": "the formula gives {value} instead of {target}.",
        "feedback_no_formula": "no {{formula}} key.",  # doubled braces are literal, also in a text without fields
        "revision": "Attempt failed: {feedback}",
    }
    env = GeneralPointsEnv(templates=templates)
    obs, _ = env.reset(seed=0, options={"hand": HAND_3388})
    assert obs["messages"][0]["content"] == (
        "[Task Description]\nYou are an expert 24 points card game player. You will receive a set of 4 cards.\n"
        "Note that 'J', 'Q', and 'K' count as '10'., and each card must be used once.\n\n[Input]\n"
        "Cards: ['3', '8', '3', '8']\n\n[Output]\n{\n  \"cards\": [x, y, z, w], where 'J', 'Q', and 'K' count as "
        "'10'.,\n  \"formula\": 'an equation that equals 24',\n}"
    )
    obs, reward, *_ , info = env.step(json.dumps({"formula": "8+3+8+3"}))
    assert reward == -1.0 and obs["messages"][-1]["content"] == "Attempt failed: the formula gives 22 instead of 24."
    assert env.step(json.dumps({"cards": []}))[4]["feedback"] == "no {formula} key."
    _, reward, terminated, _, info = env.step(env.expert_answer())
    assert (reward, terminated, info["success"]) == (5.0, True, True)
    # the defaults are untouched by another env's override
    default = GeneralPointsEnv().reset(seed=0, options={"hand": HAND_3388})[0]["messages"][0]["content"]
    assert default.startswith("You are an expert 24 points") and "'3', '8', '3', '8'" in default


@pytest.mark.parametrize(
    ("templates", "match"),
    [
        ({"promt": "x"}, "templates key 'promt' is not valid"),
        ({"prompt": "{target} {colour}"}, r"unknown field\(s\) colour"),
        ({"feedback_misread": "{reason}"}, "may use no fields"),
        ({"prompt": "{0}"}, "plain named field"),
        ({"prompt": "{cards.__class__}"}, "plain named field"),
        ({"prompt": "{target:>5}"}, "plain named field"),
        ({"prompt": "{target"}, "templates\\['prompt'\\] is not valid"),
        ({"prompt": 3}, "must be a string"),
        ("prompt", "must be a dict"),
    ],
)
def test_bad_templates_fail_at_construction_naming_the_key(templates: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GeneralPointsEnv(templates=templates)


def test_every_default_template_is_ascii() -> None:
    assert all(text.isascii() for text in DEFAULT_TEMPLATES.values())


def test_task_config_passes_templates_to_every_variant() -> None:
    from lit_sftrl.data.tasks import TaskConfig

    task = TaskConfig(name="gp_l", templates={"prompt": "Make {target} from {cards}. {answer_format}"},
                      env_kwargs={"sampling": "deck"})
    for variant in task.variant_names:
        env = task.make_env(variant)
        assert env.sampling == "deck"
        obs, info = env.reset(seed=0)
        assert obs["messages"][0]["content"].startswith("Make 24 from '")
        assert env.step(env.expert_answer())[4]["success"]
    assert "templates" not in TaskConfig(name="gp_l").env_spec()[1]
