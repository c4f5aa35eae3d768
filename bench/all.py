"""Every benchmark in one command and one table: ``python -m bench.all [--path checkpoints/tiny-mllama]``.

Environment speed (GeneralPoints, V-IRL), generation at batch 1 vs 16, rollout batched vs one at a time (and
the share of rollout time outside the model), and the PPO update's time split. Each ratio is measured side by
side in one run on the same model and episodes; the README's table comes from this command.
"""

from __future__ import annotations

import argparse

from bench.common import format_table
from bench.env_speed import BENCHMARKS as ENVIRONMENT_BENCHMARKS
from bench.generation import generation_rows
from bench.ppo_update import ppo_update_rows
from bench.rollout import rollout_rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", help="backbone directory (default: each bench builds a tiny Mllama)")
    args = parser.parse_args(argv)
    rows = [row for benchmark in ENVIRONMENT_BENCHMARKS for row in benchmark()]
    rows += generation_rows(args.path) + rollout_rows(args.path) + ppo_update_rows(args.path)
    print(format_table(rows))


if __name__ == "__main__":
    main()
