"""``lit-sftrl pretrain``: a few real optimizer steps through the CLI, reproducible from the seed."""

from __future__ import annotations

from pathlib import Path

import pytest

from lit_sftrl.pretraining.pretrain import RECORD, PretrainConfig, SkillBatches
from lit_sftrl.pretraining.skills import IMAGE_SKILLS, SkillsConfig

STEPS = 4
SMOKE = {"max_steps": STEPS, "batch_size": 2, "warmup_steps": 1, "log_every": 1}
SMOKE_SKILLS = {"size": 40, "image_share": 0.5, "image_size": 64, "street_scenes": 1}
SMOKE_FLAGS = [*(a for key, value in SMOKE.items() for a in (f"--base.{key}", str(value))),
               *(a for key, value in SMOKE_SKILLS.items() for a in (f"--base.skills.{key}", str(value)))]


def smoke_config(**changes) -> PretrainConfig:
    return PretrainConfig(**SMOKE, skills=SkillsConfig(**SMOKE_SKILLS), **changes)


@pytest.fixture(autouse=True)
def small_tokenizer_corpus(monkeypatch, corpus):
    """The real rule plays every environment (seconds); the test corpus keeps the build under a second."""
    from lit_sftrl.pretraining import corpus as corpus_module
    from lit_sftrl.pretraining.skills import corpus_texts

    monkeypatch.setattr(corpus_module, "tokenizer_corpus",
                        lambda seed=0: corpus + corpus_texts(SkillsConfig(size=100, seed=seed)))


def test_smoke_through_the_cli_and_deterministic(tmp_path, capsys):
    import json

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from lit_sftrl.cli import run
    from lit_sftrl.pretraining.pretrain import pretrain_base
    from lit_sftrl.pretraining.probe import probe_skills

    # the smoke stream holds both kinds of batch (image and text), so both forward paths are trained
    stream = iter(SkillBatches(smoke_config().skills, 2, 0))
    kinds = {next(stream)[0]["skill"] in IMAGE_SKILLS for _ in range(STEPS)}
    assert kinds == {True, False}

    first = run(["pretrain", "--base.out", str(tmp_path / "a"), *SMOKE_FLAGS])
    record = json.loads((first / RECORD).read_text())
    assert record["steps"] == STEPS and not record["stopped_by_time"] and record["tokens"] > 0
    assert (first / "pretrain_metrics.csv").read_text().count("\n") >= 2
    assert f"train {STEPS}/{STEPS} steps" in capsys.readouterr().err  # progress shows in a non-terminal log
    model = AutoModelForImageTextToText.from_pretrained(first)  # a plain Hugging Face directory
    assert AutoProcessor.from_pretrained(first).tokenizer.padding_side == "left"
    assert model.config.model_type == "mllama"
    assert not list(tmp_path.glob(".a.tmp-*"))

    scores = probe_skills(first, items=2, skills=("compass", "json", "street_image"), image_size=64)
    assert set(scores) == {"compass", "json", "json_keys", "street_image", "street_style"}
    assert all(0.0 <= value <= 1.0 for value in scores.values())

    second = pretrain_base(smoke_config(out=str(tmp_path / "b")))
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    init = tmp_path / "init"
    from lit_sftrl.pretraining.corpus import build_tiny

    build_tiny(init)  # the same seed's untrained tiny model: pretraining changed the weights
    assert (init / "model.safetensors").read_bytes() != (first / "model.safetensors").read_bytes()
    vocabulary = [{k: json.loads((d / "tokenizer.json").read_text())[k] for k in ("model", "added_tokens")}
                  for d in (init, first)]
    assert vocabulary[0] == vocabulary[1]  # the same tokenizer rule: the base and the tiny default share it


def test_config_file_and_overrides(tmp_path, capsys):
    """configs/pretrain_base.yaml is the tool's --config, parsed like every other config: flags override it, a
    misspelt key is one line naming the nearest, a missing file is refused, and the YAML holds the defaults."""
    from lit_sftrl.cli import registered_tools, tool_parser

    parser = tool_parser("pretrain", registered_tools()["pretrain"])
    config = parser.instantiate_classes(parser.parse_args(
        ["--config", str(Path(__file__).parents[1] / "configs" / "pretrain_base.yaml"), "--base.skills.size", "7",
         "--base.lr", "0.5"])).base
    assert config.out == "checkpoints/tiny-mllama-base" and config.skills.size == 7 and config.lr == 0.5
    assert config.max_minutes > 0 and config.max_steps > 0
    assert config == PretrainConfig(skills=SkillsConfig(size=7), lr=0.5)  # the file restates the defaults
    with pytest.raises(SystemExit):
        parser.parse_args(["--base.max_step", "3"])
    assert "did you mean --base.max_steps?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["--config", str(tmp_path / "missing.yaml")])


def test_the_rules_preset_is_the_base_recipe_weighted_towards_rule_skills(tmp_path):
    """configs/pretrain_rules.yaml: the base's recipe (steps, learning rate, seed, corpus) with half the text mix on
    the rule skills and the rest in the default's proportions, written elsewhere; it runs through the real CLI."""
    import json
    from dataclasses import replace

    from lit_sftrl.cli import registered_tools, run, tool_parser
    from lit_sftrl.pretraining.probe import probe_skills
    from lit_sftrl.pretraining.skills import RULE_SKILLS, TEXT_SKILLS, item_skill

    configs = Path(__file__).parents[1] / "configs"
    parser = tool_parser("pretrain", registered_tools()["pretrain"])
    base, rules = (parser.instantiate_classes(parser.parse_args(["--config", str(configs / f"{name}.yaml")])).base
                   for name in ("pretrain_base", "pretrain_rules"))
    assert rules.out == "checkpoints/tiny-mllama-base-rules" != base.out
    assert replace(rules, out=base.out, skills=base.skills) == base  # steps, lr, seed, batch, caps: the same
    assert replace(rules.skills, weights=base.skills.weights) == base.skills
    weights = dict(zip(TEXT_SKILLS, rules.skills.weights))
    assert all(weights[skill] > 0 for skill in RULE_SKILLS)
    assert sum(weights[skill] for skill in RULE_SKILLS) == pytest.approx(0.5 * sum(weights.values()))
    others = [skill for skill in TEXT_SKILLS if skill not in RULE_SKILLS]
    default = dict(zip(TEXT_SKILLS, base.skills.weights))
    assert [weights[s] / default[s] for s in others] == pytest.approx([0.5] * len(others))
    drawn = [item_skill(rules.skills, i) for i in range(2000)]
    text = [skill for skill in drawn if skill in TEXT_SKILLS]
    assert sum(skill in RULE_SKILLS for skill in text) / len(text) == pytest.approx(0.5, abs=0.04)

    out = run(["pretrain", "--config", str(configs / "pretrain_rules.yaml"), "--base.out", str(tmp_path / "rules"),
               "--base.max_steps", "2", "--base.warmup_steps", "1", "--base.batch_size", "2",
               "--base.skills.size", "50", "--base.skills.image_size", "64", "--base.skills.street_scenes", "1"])
    record = json.loads((out / RECORD).read_text())
    assert record["steps"] == 2 and record["config"]["skills"]["weights"] == list(rules.skills.weights)
    assert (out / "pretrain_metrics.csv").read_text().count("\n") >= 2  # logged although log_every (25) > 2 steps
    scores = probe_skills(out, items=2, skills=("follow_form",))  # the probe reports the rule skills
    assert set(scores) == {"follow_form", "follow_form_other_rule"} and 0 <= scores["follow_form"] <= 1


def test_a_missing_base_says_how_to_build_it(tmp_path):
    from lit_sftrl.models.tiny import resolve_model_path

    with pytest.raises(FileNotFoundError, match="lit-sftrl pretrain"):
        resolve_model_path(tmp_path / "tiny-mllama-base")


def test_answer_checks_reject_wrong_answers():
    from lit_sftrl.pretraining.probe import answer_is_correct
    from lit_sftrl.pretraining.skills import skill_item

    config = SkillsConfig(size=400, seed=5)
    arithmetic = next(item for i in range(400) if "target" in (item := skill_item(config, i, "arithmetic"))["check"])
    numbers, target = arithmetic["check"]["numbers"], arithmetic["check"]["target"]
    assert answer_is_correct(arithmetic, f"{'+'.join(map(str, numbers))} = {sum(numbers)}") == (sum(numbers) == target)
    assert not answer_is_correct(arithmetic, f"{target} = {target}")  # the right value from the wrong numbers
    assert not answer_is_correct(arithmetic, "no idea")
    json_item = next(item for i in range(400) if "expression_key" in (item := skill_item(config, i, "json"))["check"])
    reference = json_item["messages"][-1]["content"]
    assert answer_is_correct(json_item, reference)
    assert not answer_is_correct(json_item, reference.replace('"', "'"))  # not JSON
    compass = skill_item(config, 0, "compass")
    assert not answer_is_correct(compass, compass["messages"][-1]["content"] + " or so")
