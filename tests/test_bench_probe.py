"""``bench/probe_base.py``: a base's skills, and the same questions put to post-trained models of it."""

from __future__ import annotations

import json

import pytest

from bench import probe_base as bench


def test_after_probes_post_trained_models_with_the_same_questions(tiny_dir_factory, tmp_path):
    tiny = tiny_dir_factory("mllama")
    bench.main([str(tiny), "--items", "2", "--after", f"again={tiny}", "--out", str(tmp_path)])
    accuracy = json.loads((tmp_path / "probe.json").read_text())["accuracy"]
    assert list(accuracy) == ["base", "again"] and accuracy["again"] == accuracy["base"]
    assert {"arithmetic", "compass", "allowed_words", "street_style"} <= set(accuracy["base"])


def test_after_names_a_missing_checkpoint_clearly(tiny_dir_factory, tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.main([str(tiny_dir_factory("mllama")), "--after", f"rl={tmp_path / 'nope.ckpt'}"])
    assert "--after wants NAME=CKPT" in capsys.readouterr().err
