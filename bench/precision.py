"""float32 against ``bf16-mixed`` on the CPU for a PPO rollout and update: ``python -m bench.precision``.

Runs ``lit-sftrl fit --config configs/gp_l_ppo.yaml`` in this process with the tiny model, ``--updates`` updates
per run, once per precision and ``--repeats`` times, alternating (fp32, bf16, fp32, bf16, ...) so a slow spell
of a shared machine hits both. Each run's first update is left out (warm-up); the rest give the rollout and
update seconds (``time/rollout_s``, ``time/update_s`` of metrics.csv). The ratio is float32 time over bf16 time:
above 1, bf16 is faster. Rewards and the policy loss of both are printed too: bf16 changes the numbers.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PRECISIONS = ("32-true", "bf16-mixed")


def fit(model: Path, precision: str, root: Path, args: argparse.Namespace) -> list[dict[str, float]]:
    from lit_sftrl.cli import run

    run(["fit", "--config", str(REPO / "configs/gp_l_ppo.yaml"), "--trainer.precision", precision,
         "--model.init_args.backbone.path", str(model), "--model.init_args.ppo.advantage", args.advantage,
         *(["--model.init_args.ppo.group_size", "4"] if args.advantage != "gae" else []),
         "--model.init_args.ppo.ppo_epochs", "1", "--data.init_args.num_envs", str(args.envs),
         "--data.init_args.rollout_steps", str(args.attempts), "--data.init_args.evaluation.val_episodes", "0",
         "--trainer.num_sanity_val_steps", "0", "--trainer.max_epochs", str(args.updates),
         "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root),
         "--trainer.logger.init_args.save_dir", str(root)])
    with open(root / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("time/update_s")]
    return [{key: float(row[key]) for key in ("time/rollout_s", "time/update_s", "train/reward", "train/policy_loss")}
            for row in rows]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=3, help="updates per run (the first is warm-up)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--envs", type=int, default=16)
    parser.add_argument("--attempts", type=int, default=32)
    parser.add_argument("--advantage", default="gae", choices=["gae", "grpo"])
    args = parser.parse_args(argv)
    from lit_sftrl.models.tiny import make_tiny

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU bf16: {torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    seconds: dict[str, dict[str, list[float]]] = {p: {"rollout": [], "update": []} for p in PRECISIONS}
    with tempfile.TemporaryDirectory() as folder:
        model = make_tiny(Path(folder) / "tiny-mllama", family="mllama")
        for repeat in range(args.repeats):
            for precision in PRECISIONS:
                rows = fit(model, precision, Path(folder) / f"{precision}-{repeat}", args)
                for row in rows[1:]:
                    seconds[precision]["rollout"].append(row["time/rollout_s"])
                    seconds[precision]["update"].append(row["time/update_s"])
                print(f"{precision:>10} run {repeat}: rewards {[round(r['train/reward'], 3) for r in rows]}, "
                      f"policy loss {[round(r['train/policy_loss'], 4) for r in rows]}")
    for phase in ("rollout", "update"):
        fp32, bf16 = (statistics.median(seconds[p][phase]) for p in PRECISIONS)
        print(f"{phase:>8}: float32 {fp32:.2f} s, bf16-mixed {bf16:.2f} s (median), "
              f"float32 / bf16 = {fp32 / bf16:.2f}x")


if __name__ == "__main__":
    main()
