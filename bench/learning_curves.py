"""Learning runs side by side: the validation curves of several ``bench.ppo_learning`` records in one figure, and
a table of where each ended and what it cost.

    python -m bench.learning_curves docs/ppo_learning/virl_l_ppo_3seeds.json \
        docs/ppo_learning/virl_l_grpo_3seeds.json --out docs/ppo_learning/virl_l_ppo_vs_grpo.png

Each record is one setting (PPO, GRPO, ...) from the same SFT checkpoint, drawn against the attempts it had played
when evaluated (a critic-free update plays whole groups, so more attempts than a PPO update: the x axis compares
them at the same rollout budget). A record of several seeds is drawn as its mean per evaluation with two standard
errors over seeds, each seed thin beside it; a record of one seed as its curve with two binomial standard errors.

The table (markdown, printed) gives per record and variant the validation metric before the first update and after
the last, the gain with its standard error and whether it exceeds two of them (over seeds; for one seed, the two
binomial standard errors together), and per seed the attempts played, the wall and CPU seconds of the run
(evaluations included) and the seconds its updates spent in rollouts and in optimisation.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from lit_sftrl.core.statistics import Gap, mean_and_stderr


def load(path: Path) -> dict:
    """A ``bench.ppo_learning`` record, its seeds as a list whether it ran one or several."""
    record = json.loads(path.read_text())
    if "seeds" not in record:
        stage = (record.get("stages") or {}).get("ppo", {})
        record["seeds"] = [{"seed": 0, "updates": record["updates"], "validation": record["validation"]}]
        record["stage_costs"] = [stage]
    else:
        record["stage_costs"] = [record["stages"].get(f"ppo_seed{run['seed']}", {}) for run in record["seeds"]]
    record["name"] = path.stem
    return record


def variants(record: dict) -> list[str]:
    first = record["seeds"][0]["validation"][0]
    return [v for v in first if v != "update" and not v.endswith("_stderr")]


def attempts_at(run: dict, update: int) -> float:
    """Attempts the run had played when it was evaluated after ``update`` (0 before the first)."""
    if update == 0:
        return 0.0
    return next((row.get("env_steps", math.nan) for row in run["updates"] if row["update"] == update), math.nan)


def curve(record: dict, variant: str) -> list[tuple[float, float, float]]:
    """(attempts played, value, stderr) per evaluation: the mean and standard error over seeds when there are
    several (attempts: their mean), else the one seed's value with its binomial standard error. Attempts, not
    updates, on the x axis: a critic-free update plays whole groups, so it holds more attempts than a PPO update."""
    runs = record["seeds"]
    if len(runs) == 1:
        return [(attempts_at(runs[0], row["update"]), row[variant], row[f"{variant}_stderr"])
                for row in runs[0]["validation"]]
    points = []
    for rows in zip(*(run["validation"] for run in runs), strict=True):
        mean, stderr = mean_and_stderr([row[variant] for row in rows])
        attempts = sum(attempts_at(run, row["update"]) for run, row in zip(runs, rows, strict=True)) / len(runs)
        points.append((attempts, mean, stderr))
    return points


def gain(record: dict, variant: str) -> Gap:
    """Last validation minus the one before training: over seeds (mean, standard error over seeds), or for one
    seed the difference of the two evaluations with their binomial standard errors together."""
    runs = [run["validation"] for run in record["seeds"]]
    if len(runs) == 1:
        first, last = runs[0][0], runs[0][-1]
        return Gap.between(last[variant], last[f"{variant}_stderr"], first[variant], first[f"{variant}_stderr"])
    mean, stderr = mean_and_stderr([rows[-1][variant] - rows[0][variant] for rows in runs])
    return Gap(mean, stderr)


def costs(record: dict) -> dict[str, float]:
    """Mean per seed: the attempts played, the run's wall and CPU seconds, and its updates' rollout and optimisation
    seconds."""
    per_seed = [
        {"attempts": run["updates"][-1].get("env_steps", math.nan),
         "wall_s": stage.get("wall_s", math.nan), "cpu_s": stage.get("cpu_s", math.nan),
         "rollout_s": sum(row["rollout_s"] for row in run["updates"]),
         "update_s": sum(row["update_s"] for row in run["updates"])}
        for run, stage in zip(record["seeds"], record["stage_costs"], strict=True)
    ]
    return {key: sum(seed[key] for seed in per_seed) / len(per_seed) for key in per_seed[0]}


def table(records: list[dict]) -> str:
    columns = ["run", "seeds", "variant", "before", "after", "gain", "beyond 2 s.e.", "attempts", "wall s", "CPU s",
               "rollout s", "update s"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for record in records:
        cost = costs(record)
        for variant in variants(record):
            points = curve(record, variant)
            change = gain(record, variant)
            cells = [
                record["name"], str(len(record["seeds"])), variant,
                f"{100 * points[0][1]:.1f} ± {100 * points[0][2]:.1f}",
                f"{100 * points[-1][1]:.1f} ± {100 * points[-1][2]:.1f}",
                f"{100 * change.difference:+.1f} ± {100 * change.stderr:.1f}",
                "yes" if change.beyond_two_stderr else "no",
                *(f"{cost[key]:.0f}" for key in ("attempts", "wall_s", "cpu_s", "rollout_s", "update_s")),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(records: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = variants(records[0])
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for axis, variant in zip(axes[0], names, strict=True):
        for index, record in enumerate(records):
            points = curve(record, variant)
            seeds = len(record["seeds"])
            axis.errorbar([p[0] for p in points], [100 * p[1] for p in points],
                          yerr=[200 * p[2] for p in points], marker="o", capsize=3, color=f"C{index}",
                          label=f"{record['name']} ({seeds} seed{'s' * (seeds > 1)}, ± 2 s.e.)")
            if seeds > 1:
                for run in record["seeds"]:
                    axis.plot([attempts_at(run, r["update"]) for r in run["validation"]],
                              [100 * r[variant] for r in run["validation"]], color=f"C{index}", alpha=0.3, lw=1)
        metric = records[0]["metric"].split("/")[1].replace("_", " ")
        axis.set_title(f"{records[0]['task']}, validation {variant}")
        axis.set_xlabel("attempts played")
        axis.set_ylabel(f"{metric} (%)")
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", nargs="+", type=Path, help="bench.ppo_learning records (.json)")
    parser.add_argument("--out", type=Path, required=True, help="the figure (.png)")
    args = parser.parse_args(argv)
    missing = [str(path) for path in args.records if not path.is_file()]
    if missing:
        parser.error(f"no such record: {', '.join(missing)}")
    records = [load(path) for path in args.records]
    tasks = {record["task"] for record in records}
    if len(tasks) > 1:
        parser.error(f"records of different tasks cannot share a figure: {', '.join(sorted(tasks))}")
    plot(records, args.out)
    print(table(records))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
