"""PPO micro-batches on a real rollout: padding and update time of fixed groups of ``micro`` rows against the
token-budget groups PPO uses (``lit_sftrl/training/micro_batches.py``): ``python -m bench.micro_batches``.

Collects one GP-L rollout (``--attempts`` attempts, 16 environments, temperature 1) with the model at ``--path``
(default: the rollout bench's SFT model, see ``bench/rollout.py``), shuffles it into mini-batches of 32 as PPO
does (2 epochs), and splits each mini-batch three ways: as drawn into groups of ``micro`` (PPO before grouping),
sorted by length into groups of ``micro`` (the previous rule), and by length under the token budget (the rule
now). Each way is then timed side by side on the same mini-batches: the scoring forward and the backward of PPO's
update (no optimizer step), best of ``--repeats``, interleaved so a slow spell hits every way.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import Row, format_table
from lit_sftrl.data.tasks import TaskConfig
from lit_sftrl.models import Backbone, BackboneConfig, SamplingConfig
from lit_sftrl.training.micro_batches import as_drawn, attempt_lengths, by_length, padding
from lit_sftrl.training.rollout import EnvironmentPool, RolloutEngine

Splitter = Callable[[list[int], list[tuple[int, int]], int], list[list[int]]]


def sorted_fixed(indices: list[int], lengths: list[tuple[int, int]], size: int) -> list[list[int]]:
    """The previous rule: sorted by prompt + answer length, cut into groups of ``size``."""
    ordered = sorted(indices, key=lambda i: (sum(lengths[i]), lengths[i][1], i))
    return [ordered[start : start + size] for start in range(0, len(ordered), size)]


WAYS: dict[str, Splitter] = {
    "as drawn": lambda indices, lengths, size: as_drawn(indices, size),
    "sorted, fixed groups": sorted_fixed,
    "token budget (PPO now)": by_length,
}


def minibatches(count: int, size: int = 32, epochs: int = 2, seed: int = 0) -> list[list[int]]:
    rng, out = random.Random(seed), []
    for _ in range(epochs):
        order = list(range(count))
        rng.shuffle(order)
        out += [order[start : start + size] for start in range(0, count, size)]
    return out


def measure(path: str, attempts: int = 160, micro: int = 16, repeats: int = 3) -> list[Row]:
    backbone = Backbone(BackboneConfig(path=path, value_head=True))
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=64)
    task = TaskConfig(name="gp_l", verify_iter=5)
    pool = EnvironmentPool([task.make_env("id") for _ in range(16)], lambda index, number: (1000 * index + number, {}))
    with torch.no_grad():
        rollout = RolloutEngine(backbone, sampling).collect(pool, attempts, lambda env, k: 7919 * env + k)
    items = rollout.attempts
    lengths = attempt_lengths(items)
    plan = {way: [split(mb, lengths, micro) for mb in minibatches(len(items))] for way, split in WAYS.items()}
    best = dict.fromkeys(WAYS, float("inf"))
    backbone.train()
    for _ in range(repeats):
        for way, groups in plan.items():
            start = time.perf_counter()
            for group in (g for mb in groups for g in mb):
                scores = backbone.score([items[i].prompt for i in group], [items[i].answer_ids for i in group])
                (scores.logprob_sum.sum() + scores.values.sum()).backward()
            best[way] = min(best[way], time.perf_counter() - start)
            backbone.zero_grad(set_to_none=True)
    rows = []
    for way, groups in plan.items():
        flat = [g for mb in groups for g in mb]
        padded, slots = padding(flat, lengths)
        rows += [
            Row(f"PPO micro-batches, {way}: padded tokens", 100.0 * padded / slots, "%", None),
            Row(f"PPO micro-batches, {way}: forwards", len(flat), "", None),
            Row(f"PPO micro-batches, {way}: token slots", slots, "tokens", None),
            Row(f"PPO micro-batches, {way}: forward + backward", best[way], "s", None),
        ]
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default="checkpoints/bench_rollout/sft/gp_l-600/exported")
    parser.add_argument("--attempts", type=int, default=160)
    parser.add_argument("--micro", type=int, default=16, help="micro_batch_size (the PPO configs': 16)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (see bench/rollout.py)")
    args = parser.parse_args(argv)
    if not Path(args.path).exists():
        parser.error(f"{args.path} does not exist: run `python -m bench.rollout --models sft` once to build it")
    torch.set_num_threads(args.threads)
    print(format_table(measure(args.path, args.attempts, args.micro, args.repeats)))


if __name__ == "__main__":
    main()
