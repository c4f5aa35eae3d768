"""The skills corpus: reproducible, correct, and free of the tasks' own prompt wording and answer layout."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from lit_sftrl.envs import general_points, virl
from lit_sftrl.pretraining import skill_images, skills
from lit_sftrl.pretraining.probe import answer_is_correct
from lit_sftrl.pretraining.skills import IMAGE_SKILLS, TASK_ANSWER_KEYS, SkillsConfig, message_text, skill_item

# A corpus with every skill (the default mix leaves allowed_words out) and image items (two street scenes per
# style keep rendering cheap).
CONFIG = SkillsConfig(size=3000, seed=0, image_share=0.05, image_size=64, street_scenes=2,
                      weights=(0.35, 0.25, 0.25, 0.15, 0.1))


@pytest.fixture(scope="module")
def items():
    return [skill_item(CONFIG, i) for i in range(CONFIG.size)]


@pytest.fixture(scope="module")
def corpus_text(items) -> str:
    return "\n".join(message_text(m) for item in items for m in item["messages"]).lower()


def _templates() -> list[str]:
    """Every wording template of both environments (the prompts, answer formats and feedback)."""
    return [text for module in (general_points, virl) for text in module.DEFAULT_TEMPLATES.values()]


def _fragments(template: str) -> list[str]:
    """The literal pieces of a template (placeholders and line breaks cut it) of at least four words."""
    pieces = re.split(r"\{[^{}]*\}|\n|\{\{|\}\}", template)
    return [piece.strip().lower() for piece in pieces if len(piece.split()) >= 4]


def test_items_are_a_function_of_seed_and_index():
    first = skill_item(CONFIG, 17)
    again = skill_item(CONFIG, 17)
    assert first["messages"] == again["messages"] and first["skill"] == again["skill"]
    other = [skill_item(SkillsConfig(size=50, seed=1), i)["messages"] for i in range(50)]
    assert other != [skill_item(SkillsConfig(size=50, seed=0), i)["messages"] for i in range(50)]


def test_the_default_corpus_is_the_one_the_base_was_built_on():
    """Appending a skill with weight 0 (allowed_words) changed no item of the default mix: the same fingerprint
    as before it existed, images' captions included, and old configs with four weights still load."""
    config = SkillsConfig(size=400, seed=0, image_share=0.1, image_size=32, street_scenes=1)
    items = [skill_item(config, i) for i in range(400)]
    text = json.dumps([[item["skill"], item["messages"][-1]["content"] if item["image"] is not None
                        else item["messages"]] for item in items])
    assert hashlib.sha256(text.encode()).hexdigest()[:16] == "cb2e303f27ab4110"
    assert SkillsConfig(weights=(0.35, 0.25, 0.25, 0.15)).weights == config.weights


def test_allowed_words_answers_take_the_kind_of_word_the_question_allows():
    from lit_sftrl.envs.routes import COMPASS

    kinds = set()
    for i in range(200):
        item = skill_item(CONFIG, i, skill="allowed_words")
        question, answer = item["messages"][0]["content"], item["messages"][-1]["content"]
        allowed = re.search(r"(?:list|answers|among): (.+)\.$", question).group(1).split(", ")
        assert answer in allowed and answer in question.split("Which way?")[0]  # named in the directions too
        kinds.add("turn" if answer in virl.RELATIVE_WORDS else "compass")
        assert set(allowed) in (set(virl.RELATIVE_WORDS), set(COMPASS))
    assert kinds == {"turn", "compass"}


def test_every_skill_is_present_and_every_reference_answer_checks_out(items):
    assert {item["skill"] for item in items} == {*skills.TEXT_SKILLS, *IMAGE_SKILLS}
    for item in items:
        if item["skill"] in skills.TEXT_SKILLS:
            assert answer_is_correct(item, item["messages"][-1]["content"]), item
        assert (item["image"] is not None) == (item["skill"] in IMAGE_SKILLS)


def test_both_face_card_conventions_and_many_targets(corpus_text):
    assert "jack is worth 11" in corpus_text and "j = 10, q = 10, k = 10" in corpus_text
    targets = {int(t) for t in re.findall(r"= (\d+)\b", corpus_text)}
    assert {1, 13, 24, 50} <= targets and len(targets) > 60


def test_no_task_prompt_text(corpus_text):
    fragments = [f for template in _templates() for f in _fragments(template)]
    assert len(fragments) > 15  # the templates were found and cut
    leaked = [f for f in fragments if f in corpus_text]
    assert not leaked


def test_no_long_phrase_of_a_real_prompt(corpus_text):
    """Beyond the templates: no 7-word run of any prompt or feedback the environments actually show."""
    from lit_sftrl.pretraining.corpus import environment_corpus

    def grams(text: str) -> set[tuple[str, ...]]:
        words = re.findall(r"[a-z0-9']+", text.lower())
        return {tuple(words[i:i + 7]) for i in range(len(words) - 6)}

    env = set().union(*(grams(text) for text in environment_corpus(episodes=4)))
    assert not env & grams(corpus_text)


def test_no_task_answer_layout(items, corpus_text):
    env = general_points.GeneralPointsEnv()
    env.reset(seed=0)
    assert set(json.loads(env.expert_answer())) <= TASK_ANSWER_KEYS  # the excluded keys are the real ones
    for key in TASK_ANSWER_KEYS:
        assert f'"{key}"' not in corpus_text
    for item in items:
        answer = item["messages"][-1]["content"]
        if answer.startswith("{"):
            assert not TASK_ANSWER_KEYS & set(json.loads(answer))


def test_virl_answer_keys_are_excluded():
    keys = set(json.loads(virl.VIRLEnv._answer("o", "i", "a")))
    assert keys and keys <= TASK_ANSWER_KEYS


def test_relative_turns_follow_the_navigation_rule():
    """'From X to Y is <turn>' uses the navigation task's words for the heading change, in the same sense."""
    from lit_sftrl.envs.routes import COMPASS

    checked = 0
    for i in range(300):
        item = skill_item(SkillsConfig(size=300, seed=3), i, skill="compass")
        found = re.fullmatch(r"From (\w+) to (\w+) is (.+)\.", item["messages"][-1]["content"])
        if found:
            start, end, turn = found.groups()
            delta = (COMPASS.index(end) - COMPASS.index(start)) * 45
            assert turn == virl.relative_word(delta) and turn in virl.RELATIVE_WORDS
            checked += 1
    assert checked > 10


def test_image_items_show_cards_of_every_suit_and_both_city_styles():
    config = SkillsConfig(size=300, seed=0, image_size=64, street_scenes=2)
    cards = " ".join(skill_item(config, i, skill="card_image")["messages"][-1]["content"] for i in range(60))
    assert all(suit in cards for suit in ("spades", "clubs", "hearts", "diamonds"))
    streets = " ".join(skill_item(config, i, skill="street_image")["messages"][-1]["content"] for i in range(40))
    assert all(words.split()[-1] in streets or words[1:] in streets for words in skill_images.STYLE_WORDS.values())
    image = skill_item(config, 0, skill="street_image")["image"]
    assert image.shape == (64, 64, 3) and image.std() > 10
