"""``lit-sftrl make-tiny --pretrain``: a few real optimizer steps through the CLI, reproducible from the seed."""

from __future__ import annotations

from pathlib import Path

import pytest

from lit_sftrl.pretraining.pretrain import RECORD, SkillBatches, load_config
from lit_sftrl.pretraining.skills import IMAGE_SKILLS, SkillsConfig

STEPS = 4
SMOKE = [f"max_steps={STEPS}", "batch_size=2", "warmup_steps=1", "skills.size=40", "skills.image_share=0.5",
         "skills.image_size=64", "skills.street_scenes=1", "log_every=1"]


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
    stream = iter(SkillBatches(load_config(None, SMOKE).skills, 2, 0))
    kinds = {next(stream)[0]["skill"] in IMAGE_SKILLS for _ in range(STEPS)}
    assert kinds == {True, False}

    first = run(["make-tiny", "--pretrain", "--out", str(tmp_path / "a"), *sum((["--set", s] for s in SMOKE), [])])
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

    second = pretrain_base(load_config(None, [*SMOKE, f"out={tmp_path / 'b'}"]))
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    init = tmp_path / "init"
    from lit_sftrl.pretraining.corpus import build_tiny

    build_tiny(init)  # the same seed's untrained tiny model: pretraining changed the weights
    assert (init / "model.safetensors").read_bytes() != (first / "model.safetensors").read_bytes()
    vocabulary = [{k: json.loads((d / "tokenizer.json").read_text())[k] for k in ("model", "added_tokens")}
                  for d in (init, first)]
    assert vocabulary[0] == vocabulary[1]  # the same tokenizer rule: the base and the tiny default share it


def test_config_file_and_overrides(tmp_path):
    config = load_config(Path(__file__).parents[1] / "configs" / "pretrain_base.yaml", ["skills.size=7", "lr=0.5"])
    assert config.out == "checkpoints/tiny-mllama-base" and config.skills.size == 7 and config.lr == 0.5
    assert config.max_minutes > 0 and config.max_steps > 0
    with pytest.raises(ValueError, match="unknown pretraining keys"):
        load_config(None, ["max_step=3"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(None, ["max_steps"])
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")


def test_a_missing_base_says_how_to_build_it(tmp_path):
    from lit_sftrl.models.tiny import resolve_model_path

    with pytest.raises(FileNotFoundError, match="make-tiny --pretrain"):
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
