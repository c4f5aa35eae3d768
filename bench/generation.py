"""Generated tokens per second at batch 1 vs batch 16 on the tiny default: ``python bench/generation.py``.

Both sizes generate the same answers' worth of work (the same 16 image prompts, of mixed lengths, in the
GeneralPoints-VL style) with the same sampling settings; batch 1 plays them one at a time. :func:`measure`
returns the rows, :func:`main` prints them with the speed-up over batch 1 (expect >= 4x on CPU).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lit_sftrl.models import Backbone, BackboneConfig, SamplingConfig, make_tiny

PROMPT = (
    "You are an expert 24 points card game player. You will receive an image of {n} cards. Use every card "
    "exactly once with + - * / and parentheses to reach 24. Answer with a JSON object holding cards, number "
    "and formula."
)


@dataclass
class Row:
    batch_size: int
    sequences: int
    new_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds


def prompts(count: int = 16, image_size: int = 224, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [
        (
            [{"role": "user", "content": PROMPT.format(n=4) + " Think briefly." * int(rng.integers(0, 8))}],
            rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8),
        )
        for _ in range(count)
    ]


def _run(backbone: Backbone, batch: list, sampling: SamplingConfig, batch_size: int) -> Row:
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(batch), batch_size):
        tokens += sum(len(g.answer_ids) for g in backbone.generate(batch[i : i + batch_size], sampling))
    return Row(batch_size, len(batch), tokens, time.perf_counter() - start)


def measure(
    path: str | Path, batch_sizes: tuple[int, ...] = (1, 16), max_new_tokens: int = 64, repeats: int = 2
) -> list[Row]:
    """Best of ``repeats`` timed runs per batch size (after one warm-up), sampling at temperature 1."""
    backbone = Backbone(BackboneConfig(path=str(path))).eval()
    batch = prompts(max(batch_sizes))
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=max_new_tokens)
    rows = []
    for batch_size in batch_sizes:
        # Warm-up: the first generate calls of a process are ~1 s slower (lazy imports, allocator growth).
        _run(backbone, batch[: 2 * batch_size], SamplingConfig(max_new_tokens=4), batch_size)
        torch.manual_seed(0)
        runs = [_run(backbone, batch, sampling, batch_size) for _ in range(repeats)]
        rows.append(max(runs, key=lambda row: row.tokens_per_second))
    return rows


def table(rows: list[Row]) -> str:
    base = rows[0].tokens_per_second
    lines = [
        "| batch | sequences | new tokens | seconds | tokens/s | vs batch 1 |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.batch_size} | {row.sequences} | {row.new_tokens} | {row.seconds:.2f} | "
            f"{row.tokens_per_second:.0f} | {row.tokens_per_second / base:.1f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", help="model directory (default: a tiny Mllama built in a temporary directory)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.path or make_tiny(Path(tmp) / "tiny-mllama", family="mllama")
        rows = measure(path, max_new_tokens=args.max_new_tokens, repeats=args.repeats)
    print(f"generation throughput, {torch.get_num_threads()} CPU threads, {args.max_new_tokens} new tokens each")
    print(table(rows))


if __name__ == "__main__":
    main()
