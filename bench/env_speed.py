"""How fast the environments are, in one process on one core: ``python -m bench.env_speed``.

Each benchmark is a function returning rows ``(name, value, unit, target)``; :func:`main` prints them as a
table with a verdict per target. GeneralPoints rows are here, V-IRL rows in ``virl_speed.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from fractions import Fraction

from bench.common import Row, format_table, rate
from bench.virl_speed import virl_rows
from lit_sftrl.envs import solver
from lit_sftrl.envs.general_points import GeneralPointsEnv

# A well-formed answer that goes through every check (parse, evaluate, numbers), the costliest path.
ANSWER = '{"cards": ["A", "2", "3", "4"], "number": [1, 2, 3, 4], "formula": "(1 + 2 + 3) * 4 = 24"}'


def general_points_rows() -> list[Row]:
    """Table build (cold), text reset+step, seeded reset, image reset at 224 px."""
    start = time.perf_counter()
    solver.is_solvable((1, 2, 3, 4), 24)  # builds the per-process table on first use
    build = time.perf_counter() - start

    text = GeneralPointsEnv(suits="all", face_card_rule="11-13")
    text.reset(seed=0)

    def reset_and_step() -> None:
        text.reset()
        text.step(ANSWER)

    seeds = iter(range(10**9))
    image = GeneralPointsEnv(modality="image", image_size=224, suits="all")
    image.reset(seed=0)
    return [
        Row("GP solution table build (once per process)", build, "s", None),
        Row("GP text reset+step", rate(reset_and_step), "/s", 10_000),
        Row("GP text reset(seed=s) (fresh RNG each time)", rate(lambda: text.reset(seed=next(seeds))), "/s", None),
        Row("GP image reset, 224 px", rate(image.reset), "/s", 300),
    ]


def reset_versus_search_rows(blocks: int = 10, block: int = 100) -> list[Row]:
    """Reset (deal + table lookup) against solving the very same hands from scratch, side by side.

    Alternating blocks (``block`` resets, then a naive search on each hand they dealt) so that both sides see
    the same machine load; for the training variant and for the rule variant, whose face-card condition
    rejects more draws.
    """
    rows = []
    for variant in (dict(), dict(face_card_rule="11-13", suits="all")):
        env = GeneralPointsEnv(**variant)
        env.reset(seed=0)
        for _ in range(5000):  # steady state: each label multiset's playability memoised (once per process)
            env.reset()
        reset_seconds = search_seconds = 0.0
        for _ in range(blocks):
            start = time.perf_counter()
            dealt = [env.reset()[1]["numbers"] for _ in range(block)]
            middle = time.perf_counter()
            assert all(naive_solvable([Fraction(v) for v in values], Fraction(env.target)) for values in dealt)
            reset_seconds += middle - start
            search_seconds += time.perf_counter() - middle
        name = "GP " + (" ".join(variant.values()) or "10 black")
        hands = blocks * block
        rows += [
            Row(f"{name}: reset (deal + lookup)", reset_seconds / hands * 1e6, "us/hand", None),
            Row(f"{name}: naive search, same hands", search_seconds / hands * 1e6, "us/hand", None),
            Row(f"{name}: reset speed-up over search", search_seconds / reset_seconds, "x", 100),
        ]
    return rows


def naive_solvable(values: list[Fraction], target: Fraction) -> bool:
    """The textbook search: combine any two numbers with any operation, recurse, stop at the first hit."""
    if len(values) == 1:
        return values[0] == target
    for i in range(len(values)):
        for j in range(len(values)):
            if i == j:
                continue
            rest = [v for k, v in enumerate(values) if k not in (i, j)]
            x, y = values[i], values[j]
            candidates = [x + y, x - y, x * y] + ([x / y] if y else [])
            if any(naive_solvable(rest + [c], target) for c in candidates):
                return True
    return False


BENCHMARKS: list[Callable[[], list[Row]]] = [general_points_rows, reset_versus_search_rows, virl_rows]


def main() -> None:
    print(format_table([row for benchmark in BENCHMARKS for row in benchmark()]))


if __name__ == "__main__":
    main()
