"""Evaluation transcripts: what the model was asked, what it answered, what the environment said back and the
reward, attempt by attempt. One JSON line per episode, in a ``.transcripts.jsonl`` file beside the evaluation
record it belongs to (``eval/val-step0000300.json`` -> ``eval/val-step0000300.transcripts.jsonl``).

Images are not stored (the prompt says whether there was one): the episode's seed and options replay it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SUFFIX = ".transcripts.jsonl"


@dataclass
class TranscriptAttempt:
    """One attempt: the chat the model saw, its answer as decoded, the environment's feedback (the user turn it
    added after the answer; None when the episode ended there) and the attempt's reward."""

    prompt: list[dict[str, str]]
    answer: str
    feedback: str | None
    reward: float
    has_image: bool = False


@dataclass
class EpisodeTranscript:
    """One evaluation episode: where it came from (variant, reset seed and options), how it ended, its attempts."""

    variant: str
    seed: int
    options: dict[str, Any] = field(default_factory=dict)
    success: bool = False
    attempts: list[TranscriptAttempt] = field(default_factory=list)


def feedback_after(
    messages_before: Sequence[dict[str, str]], messages_after: Sequence[dict[str, str]] | None
) -> str | None:
    """The environment's feedback to an answer: the user turn(s) its next observation adds after the conversation
    the answer continued (None when the episode ended, or when the next observation starts a new conversation)."""
    if not messages_after or len(messages_after) <= len(messages_before):
        return None
    added = [m["content"] for m in messages_after[len(messages_before) :] if m.get("role") == "user"]
    return "\n".join(added) if added else None


def transcript_path(record: str | Path) -> Path:
    """The transcripts file beside an evaluation record (``x.json`` -> ``x.transcripts.jsonl``)."""
    record = Path(record)
    return record.with_name(record.stem + SUFFIX)


def write_transcripts(path: str | Path, episodes: Iterable[EpisodeTranscript]) -> Path:
    """Write one JSON line per episode, atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        for episode in episodes:
            handle.write(json.dumps(asdict(episode), ensure_ascii=False, sort_keys=True) + "\n")
    temporary.replace(path)
    return path


def read_transcripts(path: str | Path) -> list[EpisodeTranscript]:
    episodes = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            data = json.loads(line)
            data["attempts"] = [TranscriptAttempt(**attempt) for attempt in data["attempts"]]
            episodes.append(EpisodeTranscript(**data))
    return episodes
