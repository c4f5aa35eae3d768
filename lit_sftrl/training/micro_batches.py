"""PPO micro-batches grouped by length, and how much of them is padding.

A scoring forward packs a micro-batch as ``[left padding][prompt][answer]`` (:mod:`lit_sftrl.models.encoding`),
so every row costs the longest prompt + answer of its micro-batch. Rollouts mix first turns with revision turns
hundreds of tokens longer, and short answers with ones cut at the cap, so micro-batches drawn in shuffled order
are partly padding; sorted by total length, neighbours have similar totals. Grouping happens inside each
mini-batch, which keeps each optimizer step's attempts (and so its gradient) what the shuffle drew.
"""

from __future__ import annotations

from collections.abc import Sequence

Lengths = Sequence[tuple[int, int]]  # per attempt: (prompt tokens, answer tokens)


def by_length(indices: Sequence[int], lengths: Lengths, size: int) -> list[list[int]]:
    """``indices`` split into micro-batches whose members have similar prompt + answer lengths, longest first.

    A micro-batch holds at most ``size`` rows and at most ``size`` rows of the mean length in token slots (its rows
    times its longest row), so long rows go in smaller micro-batches: fixed groups of ``size`` left a fifth of
    the slots padding, because one mini-batch's rows range from a first turn to a fifth revision turn. No
    micro-batch takes more memory than ``size`` of the longest rows did; there are more forwards, on fewer tokens.
    """
    total = {i: lengths[i][0] + lengths[i][1] for i in indices}
    budget = size * sum(total.values()) / max(len(total), 1)
    micro_batches: list[list[int]] = []
    for i in sorted(indices, key=lambda i: (-total[i], -lengths[i][1], i)):
        current = micro_batches[-1] if micro_batches else []
        # longest first, so the first row of a micro-batch sets its width
        if not current or len(current) == size or (len(current) + 1) * total[current[0]] > budget:
            micro_batches.append(current := [])
        current.append(i)
    return micro_batches


def attempt_lengths(attempts: Sequence) -> list[tuple[int, int]]:
    """(prompt tokens as scoring lays them out, answer tokens) of each :class:`lit_sftrl.training.rollout.Attempt`."""
    return [(attempt.prompt_tokens, len(attempt.answer_ids)) for attempt in attempts]


def as_drawn(indices: Sequence[int], size: int) -> list[list[int]]:
    """``indices`` split into micro-batches in the order they were drawn (what PPO did before grouping)."""
    return [list(indices[start : start + size]) for start in range(0, len(indices), size)]


def padding(micro_batches: Sequence[Sequence[int]], lengths: Lengths) -> tuple[int, int]:
    """Padded token slots and all token slots of these micro-batches' scoring forwards."""
    padded = slots = 0
    for micro in micro_batches:
        width = max(lengths[i][0] + lengths[i][1] for i in micro)
        slots += len(micro) * width
        padded += len(micro) * width - sum(lengths[i][0] + lengths[i][1] for i in micro)
    return padded, slots


class PaddingMeter:
    """Padding shares of an update's micro-batches, grouped by length and as drawn."""

    def __init__(self, lengths: Lengths) -> None:
        self.lengths = lengths
        self.counts = {"grouped": [0, 0], "as_drawn": [0, 0]}

    @classmethod
    def of(cls, attempts: Sequence) -> PaddingMeter:
        """For a rollout's attempts (:class:`lit_sftrl.training.rollout.Attempt`)."""
        return cls(attempt_lengths(attempts))

    def split(self, minibatch: Sequence[int], size: int) -> list[list[int]]:
        """The mini-batch's micro-batches grouped by length, counting padding both ways."""
        grouped = by_length(minibatch, self.lengths, size)
        for key, micro_batches in (("grouped", grouped), ("as_drawn", as_drawn(minibatch, size))):
            padded, slots = padding(micro_batches, self.lengths)
            self.counts[key][0] += padded
            self.counts[key][1] += slots
        return grouped

    def shares(self) -> dict[str, float]:
        share = {key: padded / max(slots, 1) for key, (padded, slots) in self.counts.items()}
        return {"padding_share": share["grouped"], "padding_share_as_drawn": share["as_drawn"]}
