"""The skills corpus: reproducible, correct, and free of the tasks' own prompt wording and answer layout."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from lit_sftrl.envs import general_points, virl
from lit_sftrl.pretraining import skill_images, skills
from lit_sftrl.pretraining.probe import answer_is_correct, answers_another_rule
from lit_sftrl.pretraining.skills import (
    IMAGE_SKILLS,
    RULE_SKILLS,
    STATED_RULE_SKILLS,
    TASK_ANSWER_KEYS,
    SkillsConfig,
    message_text,
    rule_variants,
    skill_item,
)

# A corpus with every skill (the default mix leaves the rule skills out) and image items (two street scenes per
# style keep rendering cheap).
CONFIG = SkillsConfig(size=3000, seed=0, image_share=0.05, image_size=64, street_scenes=2,
                      weights=(0.35, 0.25, 0.25, 0.15, 0.1, 0.1, 0.1, 0.1))


@pytest.fixture(scope="module")
def items():
    return [skill_item(CONFIG, i) for i in range(CONFIG.size)]


@pytest.fixture(scope="module")
def variants():
    """Every rule's version of 150 items of each stated-rule skill: (skill, body, {rule: item})."""
    return [(skill, *rule_variants(CONFIG, i, skill)) for skill in STATED_RULE_SKILLS for i in range(150)]


@pytest.fixture(scope="module")
def corpus_text(items, variants) -> str:
    every = items + [item for _, _, by_rule in variants for item in by_rule.values()]
    return "\n".join(message_text(m) for item in every for m in item["messages"]).lower()


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
    assert config.weights[len(skills.TEXT_SKILLS) - 3:] == (0.0,) * 3  # follow_unit, follow_convention, follow_form


def test_appending_the_rule_skills_changed_no_item_of_a_five_weight_mix():
    """The allowed-words base's mix (five weights, written before the follow_* skills) draws the same corpus:
    the fingerprint its code gave before they were appended."""
    config = SkillsConfig(size=400, seed=0, image_share=0.1, image_size=32, street_scenes=1,
                          weights=(0.3, 0.2, 0.2, 0.15, 0.15))
    items = [skill_item(config, i) for i in range(400)]
    text = json.dumps([[item["skill"], item["messages"][-1]["content"] if item["image"] is not None
                        else item["messages"]] for item in items])
    assert hashlib.sha256(text.encode()).hexdigest()[:16] == "c0890a68d0345d7d"


def test_a_bad_mix_is_refused_in_one_line():
    for weights in ((0.5, -0.1), (0.0,) * 8, (0.1,) * 9):
        with pytest.raises(ValueError, match="one non-negative weight per skill"):
            SkillsConfig(weights=weights)


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


def test_both_face_card_conventions_and_many_targets(items, corpus_text):
    assert "jack is worth 11" in corpus_text and "j = 10, q = 10, k = 10" in corpus_text
    targets = {item["check"]["target"] for item in items if "target" in item["check"]}
    assert {1, 13, 24, 100} <= targets and len(targets) > 60


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


# ------------------------------------------------------------------------------ rules stated in the question


def test_rule_items_are_a_function_of_seed_and_index_and_one_of_their_variants(variants):
    assert set(STATED_RULE_SKILLS) < set(RULE_SKILLS) <= set(skills.TEXT_SKILLS)
    for skill, body, by_rule in variants[::10]:
        index = [entry for entry in variants if entry[0] == skill].index((skill, body, by_rule))
        item = skill_item(CONFIG, index, skill=skill)
        assert item == skill_item(CONFIG, index, skill=skill) and rule_variants(CONFIG, index, skill) == (body, by_rule)
        assert by_rule[item["check"]["rule"]] == item  # the item is its drawn rule's variant


def test_the_stated_rule_changes_the_answer_to_the_same_question(variants):
    """The same body recurs under every rule of its skill, with the rule stated and the answer changed: a model that
    memorises one answer per question cannot score, one that reads the rule can."""
    drawn = {skill: set() for skill in STATED_RULE_SKILLS}
    for skill, body, by_rule in variants:
        questions = {rule: item["messages"][0]["content"] for rule, item in by_rule.items()}
        assert len(by_rule) >= 3 and all(body in q and q != body for q in questions.values())
        assert len(set(questions.values())) == len(by_rule)  # each rule is stated in words of its own
        answers = [item["messages"][-1]["content"] for item in by_rule.values()]
        assert len(set(answers)) >= 2, (body, answers)
        if skill != "follow_convention":  # units and forms: (nearly) every rule its own answer
            assert len(set(answers)) >= len(answers) - 1
    for index in range(600):  # and every rule is drawn
        for skill in STATED_RULE_SKILLS:
            drawn[skill].add(skill_item(CONFIG, index, skill=skill)["check"]["rule"])
    assert {skill: len(rules) for skill, rules in drawn.items()} == {
        "follow_unit": 3 + 3 + 4 + 3 - 2,  # headings and sides share "compass word" and "degrees from north"
        "follow_convention": 4 + 3, "follow_form": 5}


def test_each_rule_reads_right():
    """Spot checks of the rules' meaning (the answers are computed, not copied, so the sense must be pinned)."""
    config = SkillsConfig(size=2000, seed=4)
    seen = set()
    for index in range(400):
        for skill in STATED_RULE_SKILLS:
            body, by_rule = rule_variants(config, index, skill)
            answers = {rule: item["messages"][-1]["content"] for rule, item in by_rule.items()}
            heading = re.fullmatch(r"Someone faces (\w+) and turns (left|right)\. .*", body)
            if heading and skill == "follow_unit":
                assert virl.relative_word(int(answers["degrees from north"]) - 45 * _compass(heading[1])) == heading[2]
                assert (int(answers["degrees from north"]) + int(answers["degrees from east"])) % 360 == 90
                seen.add("heading")
            side = re.fullmatch(r"You face (\w+)\. A \w+ stands due (\w+) of you\. Where is it\?", body)
            if side and (side[1], side[2]) == ("north", "east"):
                assert (answers["side"], answers["clock"]) == ("right", "3 o'clock")
                seen.add("side")
            hand = re.fullmatch(r"What is the hand (.+) worth in total\?", body)
            if hand and hand[1] == "A, K":
                assert answers == {"faces 10, ace 1": "11", "faces 10, ace 14": "24", "faces 11-13, ace 1": "14",
                                   "faces 11-13, ace 14": "27"}
                seen.add("hand")
            if skill == "follow_form":
                assert json.loads(answers["json"]) == {json.loads(answers["json"]).popitem()[0]: _value(answers)}
                assert answers["brackets"] == f"[{answers['alone']}]"
                assert answers["labelled"].endswith(f": {answers['alone']}")
                seen.add("form")
    assert seen >= {"heading", "side", "form"}


def _compass(word: str) -> int:
    from lit_sftrl.envs.routes import COMPASS

    return COMPASS.index(word)


def _value(answers: dict[str, str]) -> int | str:
    return int(answers["alone"]) if answers["alone"].isdigit() else answers["alone"]


def test_the_probe_scores_the_stated_rule_not_another(variants):
    """Every variant's own answer passes the probe; another rule's answer (where it differs) fails, and so does
    the right content in the wrong form."""
    for skill, _, by_rule in variants:
        for rule, item in by_rule.items():
            assert answer_is_correct(item, item["messages"][-1]["content"])
            for other in by_rule.values():
                answer = other["messages"][-1]["content"]
                if answer != item["messages"][-1]["content"]:
                    assert not answer_is_correct(item, answer), (item, answer)
                    assert answers_another_rule(by_rule, item, answer)  # the probe's "read, rule ignored" count
            assert not answers_another_rule(by_rule, item, item["messages"][-1]["content"])
            assert not answers_another_rule(by_rule, item, "no idea")
    form = next(by_rule for skill, _, by_rule in variants if skill == "follow_form" and "capitals" in by_rule)
    capitals, labelled, as_json = form["capitals"], form["labelled"], form["json"]
    assert not answer_is_correct(capitals, capitals["messages"][-1]["content"].lower())
    assert not answer_is_correct(labelled, labelled["messages"][-1]["content"].lower())
    reference = as_json["messages"][-1]["content"]
    assert answer_is_correct(as_json, reference.replace(": ", ":"))  # JSON is JSON however spaced
    assert not answer_is_correct(as_json, reference[:-1])
