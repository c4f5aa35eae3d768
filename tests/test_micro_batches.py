"""PPO micro-batches grouped by length: the same attempts per mini-batch, far less padding."""

from __future__ import annotations

import random

from lit_sftrl.training.micro_batches import PaddingMeter, as_drawn, by_length, padding


def test_grouping_keeps_the_minibatch_and_cuts_padding():
    rng = random.Random(0)
    # GP-like: prompts grow by ~100 tokens per revision turn, answers from a few tokens to the cap
    lengths = [(150 + 100 * rng.randrange(5), rng.choice([12, 20, 35, 64])) for _ in range(64)]
    order = list(range(64))
    rng.shuffle(order)
    meter = PaddingMeter(lengths)
    for start in range(0, 64, 32):
        minibatch = order[start : start + 32]
        micro_batches = meter.split(minibatch, 8)
        assert sorted(i for micro in micro_batches for i in micro) == sorted(minibatch)
        assert all(len(micro) <= 8 for micro in micro_batches)
        # token slots (rows x longest row) within 8 rows of the mini-batch's mean length, unless one row alone
        total = {i: sum(lengths[i]) for i in minibatch}
        mean = sum(total.values()) / len(total)
        assert all(len(micro) == 1 or len(micro) * max(total[i] for i in micro) <= 8 * mean for micro in micro_batches)
    shares = meter.shares()
    assert shares["padding_share"] < 0.6 * shares["padding_share_as_drawn"]


def test_padding_counts_the_scoring_layout():
    # packed rows ([left padding][prompt][answer]): as wide as the longest prompt + answer, 2 x 8 slots, 8 + 4 real
    assert padding([[0, 1]], [(5, 3), (2, 2)]) == (4, 16)
    # a long prompt with a short answer beside a short prompt with a long answer: no padding at all
    assert padding([[0, 1]], [(5, 1), (2, 4)]) == (0, 12)
    # longest first; at most 2 rows and 2 x the mean total (10) = 20 token slots per micro-batch
    assert by_length([0, 1, 2, 3], [(9, 9), (1, 1), (8, 9), (1, 2)], 2) == [[0], [2], [3, 1]]
    assert by_length([0, 1, 2, 3], [(4, 1)] * 4, 2) == [[0, 1], [2, 3]]  # equal lengths: full micro-batches
    assert as_drawn([3, 1, 2], 2) == [[3, 1], [2]]
