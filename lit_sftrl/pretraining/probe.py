"""The skills probe: a model's greedy accuracy on held-out items (another seed) of each skill of the corpus.

It tells what a base knows before post-training, and what SFT and RL kept of it after.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from lit_sftrl.envs.arithmetic import FormulaError, evaluate_formula
from lit_sftrl.pretraining.skills import (
    IMAGE_SKILLS,
    STATED_RULE_SKILLS,
    TEXT_SKILLS,
    SkillsConfig,
    rule_variants,
    skill_item,
)

_STATED_RESULT = re.compile(r"([0-9+\-*/() ]+?)\s*=\s*\d+")


def answer_is_correct(item: dict[str, Any], text: str) -> bool:
    """Whether ``text`` answers corpus ``item``: arithmetic by checking the expression (any correct one counts:
    it must use exactly the given numbers and make the target), an answer-form item by its exact form (a JSON one
    by its object), everything else by exact match up to case and a final full stop."""
    check, reference, text = item["check"], item["messages"][-1]["content"], text.strip()
    if check.get("json"):  # a form rule asking for JSON: the same object, however spaced
        try:
            return json.loads(text) == json.loads(reference)
        except ValueError:
            return False
    if check.get("exact"):  # a form rule (capitals, a label, brackets): the form is what is probed, case included
        return text == reference
    if "target" not in check:
        return text.lower().rstrip(".") == reference.lower().rstrip(".")
    if "expression_key" in check:  # a JSON answer: the keys asked for, in order, and a correct expression
        try:
            answer = json.loads(text)
            expression = answer[check["expression_key"]]
            if list(answer) != list(json.loads(reference)):
                return False
        except (ValueError, TypeError, KeyError):
            return False
    else:
        prefix = check.get("prefix", "")  # card items first state the values
        found = _STATED_RESULT.findall(text[len(prefix):]) if text.startswith(prefix) else []
        if not found:
            return False
        expression = found[-1]
    try:
        evaluation = evaluate_formula(str(expression).strip(), check["target"])
    except FormulaError:
        return False
    return evaluation.value == check["target"] and sorted(evaluation.numbers) == sorted(check["numbers"])


def probe_skills(path: str | os.PathLike, items: int = 100, seed: int = 1000, image_size: int = 224,
                 skills: tuple[str, ...] = (*TEXT_SKILLS, *IMAGE_SKILLS)) -> dict[str, float]:
    """Greedy accuracy of the model at ``path`` on held-out corpus items (another seed) of each skill, plus
    ``json_keys``: the share of JSON questions answered with a JSON object of exactly the keys asked for,
    ``street_style``: the share of street panels asked about whose city style the answer names right, and
    ``<skill>_other_rule`` for the stated-rule skills: the share answered as another rule than the stated one
    would have it (the question read, its rule not: what a model that memorised one rule does)."""
    from lit_sftrl.models.backbone import Backbone
    from lit_sftrl.models.config import BackboneConfig, SamplingConfig

    backbone = Backbone(BackboneConfig(path=str(path)))
    corpus = SkillsConfig(size=items, seed=seed, image_size=image_size)
    scores = {}
    for skill in skills:
        batch = [skill_item(corpus, i, skill=skill) for i in range(items)]
        prompts = [(item["messages"][:-1], item["image"]) for item in batch]
        answers = []
        for start in range(0, items, 25):
            answers += backbone.generate(prompts[start:start + 25], SamplingConfig(temperature=0.0, max_new_tokens=64))
        scores[skill] = sum(answer_is_correct(item, a.text) for item, a in zip(batch, answers)) / items
        if skill == "json":  # the format alone: a JSON object with exactly the keys asked for, in order
            scores["json_keys"] = sum(_same_keys(item, a.text) for item, a in zip(batch, answers)) / items
        if skill in STATED_RULE_SKILLS:
            scores[f"{skill}_other_rule"] = sum(
                answers_another_rule(rule_variants(corpus, i, skill)[1], item, a.text)
                for i, (item, a) in enumerate(zip(batch, answers))) / items
        if skill == "street_image":
            styled = [(item, a) for item, a in zip(batch, answers) if "style" in item["check"]]
            scores["street_style"] = sum(i["check"]["style"] in a.text.lower() for i, a in styled) / max(len(styled), 1)
    return scores


def _same_keys(item: dict[str, Any], text: str) -> bool:
    try:
        answer = json.loads(text)
    except ValueError:
        return False
    return isinstance(answer, dict) and list(answer) == list(json.loads(item["messages"][-1]["content"]))


def answers_another_rule(variants: dict[str, dict[str, Any]], item: dict[str, Any], text: str) -> bool:
    """Whether ``text`` answers ``item``'s question under another of its rules (one whose answer differs)."""
    reference = item["messages"][-1]["content"]
    return any(answer_is_correct(variant, text) for variant in variants.values()
               if variant["messages"][-1]["content"] != reference)
