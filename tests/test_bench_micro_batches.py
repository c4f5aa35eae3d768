"""``bench/micro_batches.py`` keeps measuring what the README reports: the three ways split the same mini-batches,
and packing by token budget pads least."""

from __future__ import annotations

from bench import micro_batches as bench


def test_every_way_splits_the_same_minibatches_and_budget_pads_least(tiny_dir_factory):
    lengths = [(100 + 37 * (i % 5), 3 + 11 * (i % 3)) for i in range(64)]
    for minibatch in bench.minibatches(len(lengths)):
        splits = {way: split(minibatch, lengths, 8) for way, split in bench.WAYS.items()}
        for micro_batches in splits.values():
            assert sorted(i for micro in micro_batches for i in micro) == sorted(minibatch)
    rows = {row.name: row.value for row in bench.measure(str(tiny_dir_factory("mllama")), attempts=12, micro=4,
                                                         repeats=1)}
    share = {way: rows[f"PPO micro-batches, {way}: padded tokens"] for way in bench.WAYS}
    assert share["token budget (PPO now)"] <= share["sorted, fixed groups"] <= share["as drawn"]
    assert all(rows[f"PPO micro-batches, {way}: forward + backward"] > 0 for way in bench.WAYS)
