"""Does PPO improve a real task? Learning curves from the SFT checkpoint of the main job's recipe.

    python bench/ppo_learning.py --task gp_l    # GeneralPoints, text: training success per update
    python bench/ppo_learning.py --task virl_l  # V-IRL, text: training per-step accuracy per update

1. ``lit-sftrl fit --config configs/<task>_sft.yaml`` without its evaluations (skipped when ``--sft`` names an
   existing checkpoint).
2. ``lit-sftrl fit --config configs/<task>_ppo.yaml --model.init_from <SFT checkpoint>`` with evaluation off
   (the curve is PPO's own training signal, over the episodes it plays).
3. From the PPO run's ``metrics.csv``: per update, the training metric with its binomial standard error,
   approx_kl and the clip fraction; the start (first 3 updates) against the end (last 3); a PNG and a JSON
   record under ``--out``.

Every command is printed before it runs, so the README can quote it.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

BIN = str(Path(sys.executable).with_name("lit-sftrl"))
NO_EVALUATION = ["--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0"]
# The training signal per task, and what its standard error counts (finished episodes or attempts).
METRIC = {"gp_l": ("train/success", "train/episodes_finished"), "gp_vl": ("train/success", "train/episodes_finished"),
          "virl_l": ("train/per_step_accuracy", None), "virl_vl": ("train/per_step_accuracy", None)}


def lit_sftrl(*args: str) -> float:
    print("$ " + shlex.join(["lit-sftrl", *args]), flush=True)
    start = time.perf_counter()
    subprocess.run([BIN, *args], check=True)
    seconds = time.perf_counter() - start
    print(f"  ({seconds:.0f} s)", flush=True)
    return seconds


def read_updates(metrics_csv: Path, task: str) -> list[dict[str, float]]:
    """One row per PPO update with the training metric, its standard error, approx_kl and clip fraction."""
    name, count = METRIC[task]
    rows = []
    with open(metrics_csv) as file:
        for row in csv.DictReader(file):
            if not row.get(name):
                continue
            p = float(row[name])
            n = float(row[count]) if count else float(row["train/env_steps"]) - sum(r["n"] for r in rows)
            rows.append({
                "update": int(float(row["train/update"])), "value": p,
                "stderr": math.sqrt(p * (1 - p) / n) if n else 0.0, "n": n,
                "approx_kl": float(row["train/approx_kl"]), "clip_fraction": float(row["train/clip_fraction"]),
                "reward": float(row["train/reward"]), "rollout_s": float(row["time/rollout_s"]),
                "update_s": float(row["time/update_s"]),
            })
    return rows


def pooled(rows: list[dict[str, float]]) -> dict[str, float]:
    """The metric over several updates together (weighted by their counts), with its standard error."""
    n = sum(r["n"] for r in rows)
    p = sum(r["value"] * r["n"] for r in rows) / n if n else 0.0
    return {"value": p, "stderr": math.sqrt(p * (1 - p) / n) if n else 0.0, "n": n}


def plot(rows: list[dict[str, float]], task: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    updates = [r["update"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 6), sharex=True)
    top.errorbar(updates, [r["value"] for r in rows], yerr=[r["stderr"] for r in rows], marker="o", capsize=3)
    top.set_ylabel(METRIC[task][0].split("/")[1].replace("_", " ") + " (training)")
    top.set_title(f"PPO from the SFT checkpoint, {task}")
    bottom.plot(updates, [r["approx_kl"] for r in rows], marker="o", label="approx KL")
    bottom.plot(updates, [r["clip_fraction"] for r in rows], marker="s", label="clip fraction")
    bottom.set_xlabel("PPO update")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="gp_l", choices=sorted(METRIC))
    parser.add_argument("--sft", type=Path, default=None, help="an SFT checkpoint (default: train one)")
    parser.add_argument("--updates", type=int, default=None, help="PPO updates (default: the config's)")
    parser.add_argument("--runs", type=Path, default=Path("checkpoints/ppo_learning"))
    parser.add_argument("--out", type=Path, default=Path("docs/ppo_learning"))
    parser.add_argument("overrides", nargs="*", help="further lit-sftrl overrides for the PPO run")
    args = parser.parse_args(argv)
    runs = args.runs / args.task
    seconds = {}
    sft = args.sft
    if sft is None or not sft.exists():
        sft_dir = runs / "sft"
        # The main job's recipe without its evaluations (they do not change the weights: sampling is seeded per row).
        seconds["sft"] = lit_sftrl("fit", "--config", f"configs/{args.task}_sft.yaml", *NO_EVALUATION,
                                   "--trainer.default_root_dir", str(sft_dir),
                                   "--trainer.logger.init_args.save_dir", str(sft_dir))
        sft = sft_dir / "checkpoints" / "last.ckpt"
    ppo_dir = runs / "ppo"
    updates = ["--trainer.max_epochs", str(args.updates)] if args.updates else []
    seconds["ppo"] = lit_sftrl(
        "fit", "--config", f"configs/{args.task}_ppo.yaml", "--model.init_from", str(sft), *updates,
        *NO_EVALUATION, "--trainer.default_root_dir", str(ppo_dir), "--trainer.logger.init_args.save_dir", str(ppo_dir),
        *args.overrides,
    )
    rows = read_updates(ppo_dir / "metrics.csv", args.task)
    start, end = pooled(rows[:3]), pooled(rows[-3:])
    args.out.mkdir(parents=True, exist_ok=True)
    plot(rows, args.task, args.out / f"{args.task}.png")
    record = {"task": args.task, "metric": METRIC[args.task][0], "sft_checkpoint": str(sft), "updates": rows,
              "start_first_3": start, "end_last_3": end, "seconds": seconds, "overrides": args.overrides}
    (args.out / f"{args.task}.json").write_text(json.dumps(record, indent=2))
    print(f"{args.task}: {METRIC[args.task][0]} {start['value']:.3f}±{start['stderr']:.3f} (first 3 updates) -> "
          f"{end['value']:.3f}±{end['stderr']:.3f} (last 3); max approx_kl {max(r['approx_kl'] for r in rows):.3f}; "
          f"wrote {args.out / args.task}.png")


if __name__ == "__main__":
    main()
