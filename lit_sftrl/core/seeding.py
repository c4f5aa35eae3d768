"""Every random draw of the package, from named, disjoint streams keyed by the configured seed.

A stream is ``(name, seed, *indices)``: its name picks one of the streams below, the seed is the one configured
for it, and the indices say which draw (rank, update, environment, episode, ...). Keys are encoded at a fixed
length per stream with the name first, so two streams never share a draw, whatever the seeds are (equal seeds,
zero, negative): numpy's ``SeedSequence`` alone treats trailing zeros as absent, and folding signs with ``abs``
would make seeds 3 and -3 one stream.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import numpy as np

Stream = Literal[
    "evaluation", "eval_sampling", "sft_batches", "ppo_episodes", "ppo_sampling", "ppo_shuffle", "ppo_groups",
    "ppo_group_sampling",
]
# Never reorder: a stream's number is part of every key it makes. ppo_groups / ppo_group_sampling: critic-free
# estimators' start states (one per group) and the sampling of each member's attempts.
STREAMS: tuple[str, ...] = get_args(Stream)
# Fixed key length per stream (name, seed as two words, then this many indices padded with zeros).
_INDICES = 4
_WORD = 2**32


def _words(value: int) -> list[int]:
    """A signed 64-bit integer as two unsigned 32-bit words (two's complement): every integer its own key."""
    value = int(value)
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"seed or index {value} does not fit in 64 bits")
    value %= 2**64
    return [value // _WORD, value % _WORD]


def stream_rng(stream: Stream, seed: int, *indices: int) -> np.random.Generator:
    """The generator of draw ``indices`` of ``stream`` under ``seed``."""
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; streams: {', '.join(STREAMS)}")
    if len(indices) > _INDICES:
        raise ValueError(f"a random stream takes at most {_INDICES} indices, got {len(indices)}")
    key = [STREAMS.index(stream) + 1, *_words(seed)]
    for index in (*indices, *([0] * (_INDICES - len(indices)))):
        key += _words(index)
    return np.random.default_rng(np.random.SeedSequence(key))


def stream_seed(stream: Stream, seed: int, *indices: int, bits: int = 31) -> int:
    """One integer seed (``[0, 2**bits)``) drawn from ``stream``: for environments' resets and torch generators."""
    return int(stream_rng(stream, seed, *indices).integers(2**bits))


def pick(rng: np.random.Generator, options: tuple | list) -> Any:
    """One of ``options``, drawn from ``rng`` (every draw goes through a stream's generator, never a global one)."""
    return options[int(rng.integers(len(options)))]
