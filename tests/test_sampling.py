"""The seeded sampler: draws follow softmax(logits / T) truncated to top-p, and depend only on the row's seed."""

from __future__ import annotations

import math

import pytest
import torch

from lit_sftrl.models.sampling import SeededSampler


def draw(logits: torch.Tensor, seeds: list[int], temperature: float, top_p: float) -> list[int]:
    sampler = SeededSampler(seeds, temperature, top_p)
    scores = logits.expand(len(seeds), -1).clone()
    return sampler(torch.zeros(len(seeds), 1, dtype=torch.long), scores).argmax(-1).tolist()


@pytest.mark.parametrize("temperature, top_p, expected", [
    (1.0, 1.0, [0.5, 0.3, 0.15, 0.05]),
    (1.0, 0.9, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]),  # 0.5 + 0.3 < 0.9: the third token is still needed
    (0.5, 1.0, [p**2 / sum(q**2 for q in (0.5, 0.3, 0.15, 0.05)) for p in (0.5, 0.3, 0.15, 0.05)]),
])
def test_draws_follow_the_truncated_tempered_distribution(temperature, top_p, expected):
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    n = 6000
    tokens = draw(logits, list(range(n)), temperature, top_p)
    for token, p in enumerate(expected):
        share = tokens.count(token) / n
        assert abs(share - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-9, (token, share, p)


def test_a_row_draws_the_same_tokens_whatever_shares_its_batch():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))
    alone = [draw(logits, [7], 1.0, 1.0) for _ in range(3)]
    assert alone[0] == alone[1] == alone[2]
    assert draw(logits, [3, 7, 11], 1.0, 1.0)[1] == alone[0][0]
    assert len(set(draw(logits, list(range(40)), 1.0, 1.0))) > 5  # different seeds, different draws
