"""Does PPO improve a real task? Learning curves from the SFT checkpoint of the main job's recipe.

    python -m bench.ppo_learning --task gp_l    # GeneralPoints, text: training success per update
    python -m bench.ppo_learning --task virl_l  # V-IRL, text: training per-step accuracy per update
    python -m bench.ppo_learning --task virl_l --seeds 3   # three PPO runs from one SFT checkpoint

1. ``lit-sftrl fit --config configs/<task>_sft.yaml`` without its evaluations (skipped when ``--sft`` names an
   existing checkpoint).
2. ``lit-sftrl fit --config configs/<task>_ppo.yaml --model.init_from <SFT checkpoint>``, evaluated before the
   first update and every ``--eval-every`` updates on ``--eval-episodes`` validation episodes per variant drawn
   from ``--eval-seed`` (a tuning seed: never the test episodes' seed, 1234 in every config).
3. From the PPO run's ``metrics.csv``: per update, the training metric with its binomial standard error,
   approx_kl and the clip fraction; the start (first 3 updates) against the end (last 3); the validation metric
   at each evaluation; a PNG and a JSON record under ``--out``.

With ``--seeds N`` step 2 runs N times from the same SFT checkpoint, seed s setting ``seed_everything`` and the
training episodes' seed (``data.seed``): the episodes played, the sampling and the value head's initialisation.
The validation episodes stay the same for every seed. The record then holds each seed's curve, and per
evaluation the mean over seeds with its standard error over seeds; the gain (last validation minus the one
before training) is judged by its mean over seeds against twice its standard error over seeds, because one
seed's curve moves by more than its own binomial error from one evaluation to the next.

The training metric is measured over the episodes PPO plays, whose mix shifts as episodes carry across updates
(later V-IRL rail points, later GeneralPoints attempts); the validation metric is measured on fixed episodes, so
it is the one that says whether the policy improved.

Every command is printed before it runs, so the README can quote it.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from bench.common import run_cli
from lit_sftrl.core.statistics import binomial_stderr, mean_and_stderr

NO_EVALUATION = ["--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0"]
TEST_SEED = 1234  # the evaluation seed of every shipped config: the test episodes, never tuned on
# The training signal per task, and what its standard error counts (finished episodes or attempts).
METRIC = {"gp_l": ("train/success", "train/episodes_finished"), "gp_vl": ("train/success", "train/episodes_finished"),
          "virl_l": ("train/per_step_accuracy", None), "virl_vl": ("train/per_step_accuracy", None)}


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
                "stderr": binomial_stderr(p, n), "n": n,
                "approx_kl": float(row["train/approx_kl"]), "clip_fraction": float(row["train/clip_fraction"]),
                "reward": float(row["train/reward"]), "rollout_s": float(row["time/rollout_s"]),
                "update_s": float(row["time/update_s"]),
                "env_steps": float(row["train/env_steps"]),  # attempts played so far (all ranks): the rollout budget
            })
    return rows


def read_validation(run_dir: Path, task: str) -> list[dict[str, float]]:
    """Each evaluation record of the run (the pre-training pass included): the update it followed, and per
    variant the validation metric with its standard error."""
    name = METRIC[task][0].split("/")[1]
    rows = []
    for path in sorted((run_dir / "eval").glob("*.json"), key=lambda p: json.loads(p.read_text())["step"]):
        record = json.loads(path.read_text())
        row: dict[str, float] = {"update": 0 if record["stage"] == "sanity" else record["epoch"] + 1}
        for variant, metrics in record["metrics"].items():
            row[variant], row[f"{variant}_stderr"] = metrics[name], metrics[f"{name}_stderr"]
        rows.append(row)
    return rows


def pooled(rows: list[dict[str, float]]) -> dict[str, float]:
    """The metric over several updates together (weighted by their counts), with its standard error."""
    n = sum(r["n"] for r in rows)
    p = sum(r["value"] * r["n"] for r in rows) / n if n else 0.0
    return {"value": p, "stderr": binomial_stderr(p, n), "n": n}


def over_seeds(curves: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    """Validation curves of several seeds (the same evaluation points) -> per point and variant, the mean over
    seeds and its standard error over seeds (sample standard deviation / sqrt(seeds); 0 for one seed)."""
    points = []
    for rows in zip(*curves, strict=True):
        point: dict[str, float] = {"update": rows[0]["update"]}
        for variant in _variants(rows[0]):
            point[variant], point[f"{variant}_stderr"] = mean_and_stderr([row[variant] for row in rows])
        points.append(point)
    return points


def gain_over_seeds(curves: list[list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per variant: each seed's last validation minus its first (before training), their mean and standard error
    over seeds, and whether the mean exceeds twice that standard error."""
    gains = {}
    for variant in _variants(curves[0][0]):
        per_seed = [rows[-1][variant] - rows[0][variant] for rows in curves]
        mean, stderr = mean_and_stderr(per_seed)
        gains[variant] = {"per_seed": per_seed, "mean": mean, "stderr": stderr,
                          "beyond_two_stderr": len(per_seed) > 1 and mean > 2 * stderr}
    return gains


def _variants(row: dict[str, float]) -> list[str]:
    return [v for v in row if v != "update" and not v.endswith("_stderr")]


def plot(rows: list[dict[str, float]], validated: list[dict[str, float]], task: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    updates = [r["update"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 6), sharex=True)
    top.errorbar(updates, [r["value"] for r in rows], yerr=[r["stderr"] for r in rows], marker="o", capsize=3,
                 label="training episodes")
    for variant in [v for v in (validated[0] if validated else {}) if v != "update" and not v.endswith("_stderr")]:
        top.errorbar([r["update"] for r in validated], [r[variant] for r in validated],
                     yerr=[r[f"{variant}_stderr"] for r in validated], marker="s", capsize=3,
                     label=f"validation, {variant}")
    top.legend()
    top.set_ylabel(METRIC[task][0].split("/")[1].replace("_", " "))
    top.set_title(f"PPO from the SFT checkpoint, {task}")
    bottom.plot(updates, [r["approx_kl"] for r in rows], marker="o", label="approx KL")
    bottom.plot(updates, [r["clip_fraction"] for r in rows], marker="s", label="clip fraction")
    bottom.set_xlabel("PPO update")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_seeds(curves: list[list[dict[str, float]]], task: str, out: Path) -> None:
    """Each seed's validation curve (thin) and their mean with two standard errors over seeds (thick)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6, 4))
    for index, variant in enumerate(_variants(curves[0][0])):
        color = f"C{index}"
        for rows in curves:
            axis.plot([r["update"] for r in rows], [r[variant] for r in rows], color=color, alpha=0.3, lw=1)
        mean = over_seeds(curves)
        axis.errorbar([r["update"] for r in mean], [r[variant] for r in mean],
                      yerr=[2 * r[f"{variant}_stderr"] for r in mean], color=color, marker="o", lw=2, capsize=3,
                      label=f"{variant}: mean of {len(curves)} seeds ± 2 s.e.")
    axis.set_xlabel("PPO update")
    axis.set_ylabel(f"validation {METRIC[task][0].split('/')[1].replace('_', ' ')}")
    axis.legend()
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
    parser.add_argument("--name", default=None, help="the run's name and record stem (default: the task)")
    parser.add_argument("--eval-every", type=int, default=5, help="PPO updates between validation passes")
    parser.add_argument("--eval-episodes", type=int, default=64, help="validation episodes per variant")
    parser.add_argument("--eval-seed", type=int, default=4321, help="seed of the validation episodes")
    parser.add_argument("--seeds", type=int, default=1, help="PPO runs from the SFT checkpoint, seeds 0..N-1")
    parser.add_argument("overrides", nargs="*", help="further lit-sftrl overrides for the PPO run")
    args = parser.parse_args(argv)
    if args.eval_seed == TEST_SEED:
        parser.error(f"--eval-seed {TEST_SEED} draws the test episodes: choose another seed for validation")
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    runs = args.runs / args.task
    name = args.name or args.task
    stages = {}
    sft = args.sft
    if sft is None or not sft.exists():
        sft_dir = runs / "sft"
        # The main job's recipe without its evaluations (they do not change the weights: sampling is seeded per row).
        stages["sft"] = run_cli("fit", "--config", f"configs/{args.task}_sft.yaml", *NO_EVALUATION,
                                   "--trainer.default_root_dir", str(sft_dir),
                                   "--trainer.logger.init_args.save_dir", str(sft_dir))
        sft = sft_dir / "checkpoints" / "last.ckpt"
    updates = ["--trainer.max_epochs", str(args.updates)] if args.updates else []
    validation = [
        "--trainer.check_val_every_n_epoch", str(args.eval_every), "--trainer.num_sanity_val_steps", "-1",
        "--data.init_args.evaluation.val_episodes", str(args.eval_episodes),
        "--data.init_args.evaluation.seed", str(args.eval_seed),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seeds))
    per_seed = []
    for seed in seeds:
        run_name = name if args.seeds == 1 else f"{name}_seed{seed}"
        ppo_dir = runs / ("ppo" if run_name == args.task else f"ppo_{run_name}")
        seeded = [] if args.seeds == 1 else ["--seed_everything", str(seed), "--data.init_args.seed", str(seed)]
        stages[f"ppo_seed{seed}" if args.seeds > 1 else "ppo"] = run_cli(
            "fit", "--config", f"configs/{args.task}_ppo.yaml", "--model.init_from", str(sft), *updates,
            *validation, *seeded, "--trainer.default_root_dir", str(ppo_dir),
            "--trainer.logger.init_args.save_dir", str(ppo_dir), "--overwrite", "true", *args.overrides,
        )
        rows = read_updates(ppo_dir / "metrics.csv", args.task)
        validated = read_validation(ppo_dir, args.task)
        start, end = pooled(rows[:3]), pooled(rows[-3:])
        plot(rows, validated, args.task, args.out / f"{run_name}.png")
        per_seed.append({"seed": seed, "run": str(ppo_dir), "updates": rows, "start_first_3": start,
                         "end_last_3": end, "validation": validated})
        print(f"{run_name}: {METRIC[args.task][0]} {start['value']:.3f}±{start['stderr']:.3f} (first 3 updates) -> "
              f"{end['value']:.3f}±{end['stderr']:.3f} (last 3); max approx_kl "
              f"{max(r['approx_kl'] for r in rows):.3f}")
        for row in validated:
            print(f"  validation after update {row['update']}: " + ", ".join(
                f"{v} {row[v]:.3f}±{row[v + '_stderr']:.3f}" for v in _variants(row)))
    record = {"task": args.task, "metric": METRIC[args.task][0], "sft_checkpoint": str(sft),
              "validation_seed": args.eval_seed, "stages": stages, "overrides": args.overrides}
    if args.seeds == 1:
        record |= {key: per_seed[0][key] for key in ("updates", "start_first_3", "end_last_3", "validation")}
    else:
        curves = [run["validation"] for run in per_seed]
        record |= {"seeds": per_seed, "validation_over_seeds": over_seeds(curves), "gain": gain_over_seeds(curves)}
        plot_seeds(curves, args.task, args.out / f"{name}.png")
        for variant, gain in record["gain"].items():
            verdict = "beyond" if gain["beyond_two_stderr"] else "within"
            print(f"{name}, {args.seeds} seeds, validation {variant}: gain {gain['mean']:+.3f} ± {gain['stderr']:.3f} "
                  f"(standard error over seeds; {verdict} two standard errors)")
    (args.out / f"{name}.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out / name}.json")


if __name__ == "__main__":
    main()
