"""Evaluation transcripts (prompt, answer, feedback, reward per attempt) beside the records, and validate's advice
when answers run into max_new_tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lit_sftrl.cli import run
from lit_sftrl.training.transcripts import (
    EpisodeTranscript,
    TranscriptAttempt,
    feedback_after,
    read_transcripts,
    transcript_path,
    write_transcripts,
)

REPO = Path(__file__).resolve().parents[1]


def test_transcripts_round_trip_as_one_json_line_per_episode(tmp_path):
    before = [{"role": "user", "content": "Cards: A, 5, 10, K."}]
    after = before + [{"role": "assistant", "content": "{}"}, {"role": "user", "content": "Wrong: try again."}]
    attempt = TranscriptAttempt(prompt=before, answer="{}", feedback=feedback_after(before, after), reward=-1.0)
    last = TranscriptAttempt(prompt=after, answer='{"formula": "24"}', feedback=feedback_after(after, None), reward=5.0)
    episodes = [EpisodeTranscript("id", 7, {"cards": [1, 5]}, True, [attempt, last]), EpisodeTranscript("ood", 8)]
    path = write_transcripts(transcript_path(tmp_path / "eval" / "val-step0000010.json"), episodes)
    assert path.name == "val-step0000010.transcripts.jsonl"
    assert len(path.read_text().splitlines()) == 2 and json.loads(path.read_text().splitlines()[0])["seed"] == 7
    assert read_transcripts(path) == episodes
    assert attempt.feedback == "Wrong: try again." and last.feedback is None


def test_validate_writes_transcripts_and_warns_when_answers_hit_the_cap(tiny_dir_factory, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    path = tiny_dir_factory("mllama")
    with pytest.warns(UserWarning, match="hit the cap eval_sampling.max_new_tokens=2"):
        run(["validate", "--config", "configs/gp_l_sft.yaml", "--model.init_args.backbone.path", str(path),
             "--model.init_args.save_transcripts", "true", "--model.init_args.eval_sampling.max_new_tokens", "2",
             "--data.init_args.evaluation.val_episodes", "2", "--data.init_args.evaluation.chunk", "2",
             "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
             "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path)])
    records = sorted((tmp_path / "eval").glob("*.json"))
    transcripts = read_transcripts(transcript_path(records[-1]))
    metrics = json.loads(records[-1].read_text())["metrics"]
    assert len(transcripts) == sum(int(m["episodes"]) for m in metrics.values())
    assert {t.variant for t in transcripts} == set(metrics)
    attempts = sum(m["attempts"] * m["episodes"] for m in metrics.values())
    assert sum(len(t.attempts) for t in transcripts) == pytest.approx(attempts)
    for transcript in transcripts:  # each attempt's feedback is the user turn that the next prompt ends with
        assert transcript.attempts
        for attempt, following in zip(transcript.attempts, transcript.attempts[1:]):
            assert attempt.prompt and isinstance(attempt.answer, str) and isinstance(attempt.reward, float)
            assert following.prompt[-2:] == [{"role": "assistant", "content": attempt.answer},
                                             {"role": "user", "content": following.prompt[-1]["content"]}]
            assert attempt.feedback and attempt.feedback in following.prompt[-1]["content"]
