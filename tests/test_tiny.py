"""The tiny offline model builder: deterministic, atomic, loadable by plain transformers, honest tokenizer."""

from __future__ import annotations

import pytest
import torch

from lit_sftrl.models.tiny import FAMILIES, make_tiny, parse_tiny_name, resolve_model_path


def _files(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_make_tiny_is_deterministic(family, corpus, tmp_path):
    first = _files(make_tiny(tmp_path / "a", family=family, seed=3, corpus=corpus))
    second = _files(make_tiny(tmp_path / "b", family=family, seed=3, corpus=corpus))
    assert first == second  # byte-identical weights, tokenizer, configs
    other = _files(make_tiny(tmp_path / "c", family=family, seed=4, corpus=corpus))
    assert other["model.safetensors"] != first["model.safetensors"]
    assert other["tokenizer.json"] == first["tokenizer.json"]  # the tokenizer depends on the corpus only


@pytest.mark.parametrize("size, low, high", [("tiny", 2e6, 5e6), ("small", 12e6, 25e6)])
def test_loads_with_plain_transformers(family, size, low, high, corpus, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = make_tiny(tmp_path / "m", family=family, size=size, corpus=corpus)
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    assert low < sum(p.numel() for p in model.parameters()) < high
    tokenizer = processor.tokenizer
    assert tokenizer.padding_side == "left" and len(tokenizer) <= {"tiny": 2048, "small": 4096}[size]
    assert model.config.get_text_config().vocab_size == len(tokenizer)
    assert {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id} <= set(tokenizer.all_special_ids)
    assert model.config.image_token_id in tokenizer.all_special_ids
    assert not list(tmp_path.glob(".m.tmp-*"))  # written atomically: no temporary directory left behind


def test_tokenizer_is_byte_level_and_strips_its_special_tokens(tiny_dir_factory):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_dir_factory("mllama"))
    text = 'Ünïcode → {"formula": "(8 / (3 - 8 / 3))"} 24 ♠♥'
    assert processor.tokenizer.decode(processor.tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    rendered = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    ids = processor.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert processor.tokenizer.decode(ids, skip_special_tokens=True) == "userhiassistant"


def test_default_corpus_builds_a_working_model(tmp_path):
    from transformers import AutoProcessor

    path = make_tiny(tmp_path / "default", family="mllama")
    tokenizer = AutoProcessor.from_pretrained(path).tokenizer
    assert 300 < len(tokenizer) <= 2048
    assert tokenizer.decode(tokenizer("anything at all: 12345", add_special_tokens=False)["input_ids"]) == (
        "anything at all: 12345"
    )


def test_mllama_cross_attention_gates_are_open(tiny_dir_factory):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_dir_factory("mllama"))
    gates = [p for n, p in model.named_parameters() if n.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate"))]
    assert gates and all(torch.tanh(g).abs().min() > 0.3 for g in gates)


def test_existing_directory_is_left_untouched(tiny_dir_factory):
    path = tiny_dir_factory("llava")
    before = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    assert make_tiny(path, family="llava", seed=99) == path
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == before


def test_tiny_names():
    assert parse_tiny_name("tiny-mllama") == ("mllama", "tiny")
    assert parse_tiny_name("tiny-llava-small") == ("llava", "small")
    assert parse_tiny_name("tiny-gpt5") is None and parse_tiny_name("Llama-3.2-11B-Vision") is None
    assert set(FAMILIES) == {"mllama", "llava"}


def test_resolve_model_path_builds_tiny_names_only(corpus, tmp_path):
    built = resolve_model_path(tmp_path / "ckpts" / "tiny-llava", corpus=corpus)
    assert (built / "config.json").exists() and resolve_model_path(built) == built
    with pytest.raises(FileNotFoundError, match="Llama-3.2-11B-Vision"):
        resolve_model_path(tmp_path / "Llama-3.2-11B-Vision")


def test_backbone_builds_a_missing_tiny_directory(tmp_path):
    from lit_sftrl.models import Backbone, BackboneConfig

    backbone = Backbone(BackboneConfig(path=str(tmp_path / "tiny-mllama")))
    assert (tmp_path / "tiny-mllama" / "model.safetensors").exists() and backbone.num_parameters > 1e6


@pytest.mark.parametrize("kwargs", [{"family": "gpt2"}, {"size": "huge"}, {"image_size": 100}])
def test_invalid_options_are_rejected(kwargs, tmp_path):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        make_tiny(tmp_path / "x", **kwargs)
