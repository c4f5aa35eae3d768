"""Paper-style reports from run directories (docs/spec.md §6-§8; Chu et al. 2025, Figs. 5-8).

Input: each run directory holds ``eval/*.json`` records written by the trainer (stage ``sanity``/``val``/``test``,
``step``, cumulative ``flops``, ``module``, ``init_from``, ``metrics[variant]``, optional ``task``).
``make_report`` writes into ``out``, headless (matplotlib Agg; no torch import):

* ``curves.png`` (1000x400 px): headline metric vs training GFLOPs per variant, sanity + val records (Fig. 5).
* ``bars.png`` (1000x400 px): Init / SFT / RL at matched compute with stderr error bars (Figs. 6-7); with
  ``seeds`` N, the mean of N seeds per arm, its standard error over seeds, and each seed's dot.
* ``recognition.png`` (1000x400 px): recognition vs success per run and variant, only if some record has
  ``recognition`` (Fig. 8).
* ``report.md``: the Init / SFT / RL table (with several seeds, each seed's value too), the verdict on the paper's
  sign pattern (RL above Init, SFT below, each gap beyond two standard errors), the matched compute, the runs
  used, links to the figures, and every run's last record.

Headline metric (docs/spec.md §8): success, except for V-IRL runs (record key ``task`` in ``virl_l``/``virl_vl``),
where it
is per-step accuracy on ``id`` and ``rule_ood`` and route success on ``visual_ood``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lit_sftrl.core.statistics import Gap, mean_and_stderr  # noqa: E402

FIGSIZE, DPI = (10.0, 4.0), 100  # every figure is 1000x400 pixels
VARIANTS = ("id", "rule_ood", "visual_ood")
STAGE_ORDER = {"sanity": 0, "val": 1, "test": 2}
KINDS = {"SFTModule": "SFT", "PPOModule": "RL"}
STYLES = {"SFT": ("Blues", "--", "s"), "RL": ("Oranges", "-", "o"), "other": ("Greys", ":", "^")}
BAR_COLOURS = {"Init": "tab:gray", "SFT": "tab:blue", "RL": "tab:orange"}
Record = dict[str, Any]


# Two runs "match" in compute when within this fraction: SFT steps and PPO updates cannot land on equal FLOPs.
MATCH_TOLERANCE = 0.05

@dataclass(frozen=True)
class Run:
    """One run directory: its records sorted by (flops, step, stage), its kind (SFT / RL / other) and task."""

    name: str
    records: list[Record]
    kind: str
    task: str | None
    init_from: str | None

    @property
    def eval_only(self) -> bool:
        """Only test records: an evaluation of a fixed checkpoint, not a training run (an Init candidate)."""
        return all(r.get("stage") == "test" for r in self.records)

    def series(self, stages: Iterable[str]) -> list[Record]:
        """The run's records of the given stages, in compute order."""
        return [r for r in self.records if r.get("stage") in set(stages)]

    def metric(self, variant: str) -> str:
        """The headline metric's name for this run and variant (docs/spec.md §8)."""
        if (self.task or "").startswith("virl") and variant != "visual_ood":
            return "per_step_accuracy"
        return "success"

    def value(self, record: Record, variant: str, metric: str | None = None) -> tuple[float, float] | None:
        """(p, stderr) of a metric (default: the headline) in one record, None when the variant is absent."""
        metrics = record["metrics"].get(variant)
        metric = metric or self.metric(variant)
        if not metrics or metric not in metrics:
            return None
        return float(metrics[metric]), float(metrics.get(f"{metric}_stderr", 0.0))


@dataclass(frozen=True)
class Pick:
    """The record chosen for one bar (one seed's, in an arm of several seeds)."""

    run: Run
    record: Record


@dataclass(frozen=True)
class Score:
    """One arm's headline metric on one variant: each seed's value with its binomial standard error, their mean,
    and the standard error the comparisons use (over seeds with several seeds; the one record's binomial
    standard error with one seed or for Init, which is one checkpoint)."""

    per_seed: list[tuple[float, float]]
    mean: float
    stderr: float

    @property
    def over_seeds(self) -> bool:
        return len(self.per_seed) > 1

    def as_dict(self) -> dict[str, Any]:
        return {"per_seed": [{"value": p, "binomial_stderr": se} for p, se in self.per_seed], "mean": self.mean,
                "stderr": self.stderr, "stderr_kind": "over seeds" if self.over_seeds else "binomial"}


def score(picks: Sequence[Pick], variant: str) -> Score | None:
    """The arm's :class:`Score` on ``variant``; None when some seed's record lacks the variant."""
    values = [pick.run.value(pick.record, variant) for pick in picks]
    if not values or any(value is None for value in values):
        return None
    if len(values) == 1:
        return Score(values, *values[0])
    return Score(values, *mean_and_stderr([p for p, _ in values]))


def verdict(scores: dict[str, Score | None]) -> dict[str, Any] | None:
    """The paper's sign pattern on one variant: RL above Init and SFT below Init, each gap beyond twice its
    standard error (the two arms' standard errors together, sqrt(se_a^2 + se_b^2)). None without all three."""
    init, sft, rl = (scores.get(label) for label in ("Init", "SFT", "RL"))
    if not (init and sft and rl):
        return None
    rl_above = Gap.between(rl.mean, rl.stderr, init.mean, init.stderr)
    sft_below = Gap.between(init.mean, init.stderr, sft.mean, sft.stderr)
    return {"rl_minus_init": rl_above.as_dict(), "init_minus_sft": sft_below.as_dict(),
            "sign_pattern": rl_above.beyond_two_stderr and sft_below.beyond_two_stderr}


def load_run(path: Path) -> Run:
    """Read ``path/eval/*.json``; ValueError naming the directory when there are none."""
    files = sorted((Path(path) / "eval").glob("*.json"))
    if not files:
        raise ValueError(f"{path}: no evaluation records (expected {Path(path) / 'eval'}/*.json)")
    records = []
    for file in files:
        try:
            records.append(json.loads(file.read_text()))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: unreadable evaluation record {file.name}: {error}") from error
        if not isinstance(records[-1], dict) or "flops" not in records[-1] or "metrics" not in records[-1]:
            raise ValueError(f"{path}: evaluation record {file.name} lacks 'flops' or 'metrics'")
    records.sort(key=lambda r: (float(r["flops"]), int(r.get("step", 0)), STAGE_ORDER.get(r.get("stage"), 3)))
    def first(key: str) -> Any:
        return next((r[key] for r in records if r.get(key)), None)

    kind = KINDS.get(first("module"), "other")
    return Run(Path(path).resolve().name, records, kind, first("task"), first("init_from"))


def savgol(y: Sequence[float], window: int, order: int = 3) -> np.ndarray:
    """Savitzky-Golay smoothing (scipy's ``mode="interp"``) with numpy only: each point is the value of the
    order-``order`` polynomial least-squares fit over the ``window`` points around it (shifted inward at the
    edges), on the point index. The window is made odd and clipped to the series; with too few points for a
    window larger than ``order`` + 1 the series is returned unchanged."""
    y = np.asarray(y, dtype=float)
    window = min(window + (window % 2 == 0), len(y) - (len(y) % 2 == 0))
    if window <= order + 1:
        return y
    half, out = window // 2, np.empty_like(y)
    for i in range(len(y)):
        lo = min(max(i - half, 0), len(y) - window)
        index = np.arange(lo, lo + window)
        out[i] = np.polyval(np.polyfit(index, y[index], order), i)
    return out


def variants_of(runs: Sequence[Run], metric: str | None = None) -> list[str]:
    """Variants present in any record (those carrying ``metric`` if given): the paper's order first, then the
    order the records list (an environment's own variants), then any others by name."""
    found = {variant for run in runs for r in run.records for variant, m in r["metrics"].items()
             if metric is None or metric in m}
    listed = dict.fromkeys([*VARIANTS, *(v for run in runs for r in run.records for v in r.get("variants") or [])])
    return [v for v in listed if v in found] + sorted(found - set(listed))


def run_styles(runs: Sequence[Run]) -> dict[str, dict[str, Any]]:
    """Line style per run: one colour family per kind (SFT blues, RL oranges), shades within it."""
    styles = {}
    for kind, (cmap, linestyle, marker) in STYLES.items():
        names = [run.name for run in runs if run.kind == kind]
        shades = plt.get_cmap(cmap)(np.linspace(0.55, 0.9, max(len(names), 1)))
        for name, colour in zip(names, shades):
            styles[name] = {"color": colour, "linestyle": linestyle, "marker": marker, "label": f"{name} ({kind})"}
    return styles


def matched_compute(runs: Sequence[Run], seeds: int = 1, tests: bool = False
                    ) -> tuple[list[float], dict[str, list[Pick]]]:
    """Per seed the matched compute budget, and the Init / SFT / RL records for the bars (see ``make_report``)."""
    trained = [run for run in runs if not run.eval_only]
    arms = {kind: [run for run in trained if run.kind == kind][:seeds] for kind in ("SFT", "RL")}
    for kind, chosen in arms.items():
        if chosen and len(chosen) < seeds:
            raise ValueError(f"--seeds {seeds}: {len(chosen)} {kind} run(s) given; give one {kind} run per seed")
    pairs = [[chosen[seed] for chosen in arms.values() if chosen] for seed in range(seeds)]
    budgets = [min(run.records[-1]["flops"] for run in pair) for pair in pairs if pair]
    picks: dict[str, list[Pick]] = {}
    # A test of the Init checkpoint (paper-sized) beats the sanity check of a run started from it (val-sized).
    init = next(((run, run.records) for run in runs if run.eval_only), None)
    init = init or next(
        ((run, run.series(["sanity"])) for run in trained if run.init_from and run.series(["sanity"])), None
    )
    if init:
        picks["Init"] = [Pick(init[0], init[1][0])]
    for kind, chosen in arms.items():
        # Seed s of SFT and seed s of RL meet at their own budget: each SFT seed is matched to its RL seed.
        chosen_picks = [pick for run, budget in zip(chosen, budgets)
                        if (pick := _last_test(run) if tests else _within(run, budget))]
        if chosen and len(chosen_picks) == len(chosen):
            picks[kind] = chosen_picks
    return budgets, picks


def _last_test(run: Run) -> Pick | None:
    """The run's last test record: its final checkpoint on the test episodes."""
    tested = run.series(["test"])
    return Pick(run, tested[-1]) if tested else None


def _within(run: Run, budget: float) -> Pick | None:
    """The run's last record within ``budget`` (+ MATCH_TOLERANCE), preferring test, then val, then sanity."""
    for stage in ("test", "val", "sanity"):
        within = [r for r in run.series([stage]) if r["flops"] <= budget * (1 + MATCH_TOLERANCE)]
        if within:
            return Pick(run, within[-1])
    return None


def metric_label(runs: Sequence[Run], variant: str) -> str:
    """The headline metric's name for a variant, or 'headline' where the runs disagree."""
    names = {run.metric(variant) for run in runs} or {"success"}
    return names.pop() if len(names) == 1 else "headline"


def new_figure(n: int, title: str) -> tuple[Any, list[Any]]:
    """A 1000x400-pixel figure with ``n`` subplots side by side."""
    fig, axes = plt.subplots(1, max(n, 1), figsize=FIGSIZE, dpi=DPI, squeeze=False, layout="constrained")
    fig.suptitle(title)
    return fig, list(axes[0])


def save(fig: Any, path: Path) -> Path:
    """Save at the fixed size (no tight bbox, so the pixel size is exactly FIGSIZE * DPI) and close."""
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def compute_modes(runs: Sequence[Run]) -> str:
    """How the runs' FLOPs were counted: real tokens, or the paper's approximation (records before the key: tokens)."""
    modes = sorted({record.get("compute_mode", "tokens") for run in runs for record in run.records})
    names = {"tokens": "tokens processed", "paper": "the paper's approximation"}
    return (
        " and ".join(names.get(mode, mode) for mode in modes) + (" (mixed: not comparable)" if len(modes) > 1 else "")
    )


def plot_curves(runs: Sequence[Run], variants: list[str], path: Path, smooth: int) -> Path:
    """Fig. 5: headline metric (%) vs GFLOPs, sanity + val records, SFT and RL on shared axes."""
    smoothing = f" (Savitzky-Golay, order 3, window {smooth})" if smooth > 1 else ""
    fig, axes = new_figure(len(variants), "Headline metric vs training compute" + smoothing)
    styles = run_styles(runs)
    for ax, variant in zip(axes, variants):
        for run in runs:
            points = [(r["flops"] / 1e9, v[0]) for r in run.series(["sanity", "val"]) if (v := run.value(r, variant))]
            if points:
                x, y = np.array(points).T
                y = np.clip(savgol(y, smooth), 0.0, 1.0) if smooth > 1 else y
                ax.plot(x, 100 * y, markersize=4, **styles[run.name])
        ax.set(
            title=variant, xlabel=f"training GFLOPs ({compute_modes(runs)})",
            ylabel=f"{metric_label(runs, variant)} (%)",
        )
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    return save(fig, path)


def plot_bars(scores: dict[str, dict[str, Score | None]], budgets: list[float], path: Path,
              used: Sequence[Run]) -> Path:
    """Figs. 6-7: Init / SFT / RL headline metric (%) at matched compute with stderr error bars; with several
    seeds, each bar is their mean, its error bar the standard error over seeds, and the dots the seeds."""
    title = "Init / SFT / RL" + (f" at matched compute {budgets[0] / 1e9:.4g} GFLOPs" if len(budgets) == 1 else
                                 f" at matched compute per seed, mean ± s.e. over {len(budgets)} seeds"
                                 if budgets else "")
    fig, axes = new_figure(len(scores), title)
    for ax, (variant, by_arm) in zip(axes, scores.items()):
        bars = [(label, value) for label, value in by_arm.items() if value]
        for i, (label, value) in enumerate(bars):
            p, se = 100 * value.mean, 100 * value.stderr
            ax.bar(i, p, yerr=se, capsize=4, color=BAR_COLOURS[label])
            if value.over_seeds:
                seeds = [100 * q for q, _ in value.per_seed]
                ax.plot(np.linspace(i - 0.2, i + 0.2, len(seeds)), seeds, "k.", markersize=5)
            ax.annotate(f"{p:.1f}", (i, p + se), ha="center", va="bottom", fontsize="small")
        ax.set_xticks(range(len(bars)), [label for label, _ in bars])
        ax.set(title=variant, ylabel=f"{metric_label(used, variant)} (%)", ylim=(0, 105))
    return save(fig, path)


def plot_recognition(runs: Sequence[Run], variants: list[str], path: Path) -> Path:
    """Fig. 8: recognition accuracy vs success (%) through each run's checkpoints in compute order."""
    fig, axes = new_figure(len(variants), "Recognition vs success (checkpoints in compute order; large marker = last)")
    styles = run_styles(runs)
    for ax, variant in zip(axes, variants):
        for run in runs:
            records = run.series(["sanity", "val"]) or run.series(["test"])
            pairs = [(run.value(r, variant, "recognition"), run.value(r, variant, "success")) for r in records]
            points = np.array([(rec[0], suc[0]) for rec, suc in pairs if rec and suc]) * 100
            if len(points):
                ax.plot(points[:, 0], points[:, 1], markersize=4, **styles[run.name])
                ax.plot(*points[-1], marker=styles[run.name]["marker"], markersize=9, color=styles[run.name]["color"])
        ax.set(title=variant, xlabel="recognition accuracy (%)", ylabel="success (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    return save(fig, path)


def percent(value: tuple[float, float] | Score | None) -> str:
    """``p ± se`` in percent with one decimal (a :class:`Score`: its mean and the standard error it uses), or an
    em dash."""
    if isinstance(value, Score):
        value = (value.mean, value.stderr)
    return f"{100 * value[0]:.1f} ± {100 * value[1]:.1f}" if value else "—"


def signed(gap: dict[str, Any]) -> str:
    """A gap in points: ``+5.0 ± 2.1 (beyond)`` / ``(within)``, beyond meaning larger than twice its stderr."""
    return (f"{100 * gap['difference']:+.1f} ± {100 * gap['stderr']:.1f} "
            f"({'beyond' if gap['beyond_two_stderr'] else 'within'})")


def describe(pick: Pick) -> str:
    """Which record a bar uses."""
    r = pick.record
    return f"`{pick.run.name}` ({r.get('stage')}, step {r.get('step')}, {r['flops'] / 1e9:.4g} GFLOPs)"


def scores_of(picks: dict[str, list[Pick]], variants: list[str]) -> dict[str, dict[str, Score | None]]:
    """Per variant, each arm's :class:`Score`."""
    return {variant: {label: score(arm, variant) for label, arm in picks.items()} for variant in variants}


def comparison(runs: Sequence[Run], seeds: int = 1, tests: bool = False) -> dict[str, Any]:
    """The bars' numbers as plain data (``lit-sftrl study`` writes them to ``study.json``): the matched budget per
    seed; per arm the records used (run, stage, step, FLOPs) and per variant its :class:`Score`; per variant the
    verdict (:func:`verdict`)."""
    budgets, picks = matched_compute(runs, seeds, tests)
    scores = scores_of(picks, variants_of(runs))
    arms = {label: {"records": [{"run": pick.run.name, "stage": pick.record.get("stage"),
                                 "step": pick.record.get("step"), "flops": pick.record["flops"]} for pick in arm],
                    "metric": {variant: arm[0].run.metric(variant) for variant in scores},
                    "scores": {variant: value.as_dict() for variant, by_arm in scores.items()
                               if (value := by_arm[label])}}
            for label, arm in picks.items()}
    return {"seeds": seeds, "matched_flops": budgets, "arms": arms,
            "verdict": {variant: verdict(by_arm) for variant, by_arm in scores.items()}}


def markdown(
    runs: Sequence[Run], variants: list[str], budgets: list[float], picks: dict[str, list[Pick]], figures: list[str]
) -> str:
    """The report: Init / SFT / RL table at matched compute (with several seeds, each seed's too), the sign
    pattern's verdict, provenance, figures, every run's last record."""
    seeds = max((len(arm) for arm in picks.values()), default=1)
    scores = scores_of(picks, variants)
    matched = ("n/a" if not budgets else f"{budgets[0] / 1e9:.4g} GFLOPs" if len(budgets) == 1 else
               "per seed " + ", ".join(f"{budget / 1e9:.4g}" for budget in budgets) + " GFLOPs")
    lines = ["# lit-sftrl report", "", "Runs: " + ", ".join(f"`{run.name}` ({run.kind})" for run in runs), ""]
    lines += [f"Matched compute: {matched}", "", f"FLOPs counted: {compute_modes(runs)}", ""]
    used = [pick.run for arm in picks.values() for pick in arm]
    heading = "headline metric, % ± stderr" if seeds == 1 else (
        f"headline metric, %: SFT and RL the mean of {seeds} seeds ± its standard error over seeds, Init (one "
        "checkpoint) ± its binomial standard error")
    lines += [f"## Init / SFT / RL at matched compute ({heading})", "",
              "| variant | metric | Init | SFT | RL |", "|---|---|---|---|---|"]
    for variant in variants:
        values = [scores[variant].get(label) for label in ("Init", "SFT", "RL")]
        lines.append(f"| {variant} | {metric_label(used, variant)} | " + " | ".join(map(percent, values)) + " |")
    lines += [""] + [f"- {label}: " + ", ".join(map(describe, arm)) for label, arm in picks.items()] + [""]
    if seeds > 1:
        columns = " | ".join(f"seed {s}" for s in range(seeds))
        lines += ["## Each seed (headline metric, % ± binomial stderr)", "",
                  f"| variant | arm | {columns} | mean ± stderr over seeds |", "|---" * (3 + seeds) + "|"]
        lines += [f"| {variant} | {label} | {' | '.join(map(percent, value.per_seed))} | {percent(value)} |"
                  for variant in variants for label in ("SFT", "RL") if (value := scores[variant].get(label))]
        lines.append("")
    verdicts = {variant: v for variant in variants if (v := verdict(scores[variant]))}
    if verdicts:
        kind = "binomial" if seeds == 1 else "over seeds for SFT and RL, binomial for Init"
        lines += ["## The sign pattern: RL above Init and SFT below Init, each gap beyond two standard errors", "",
                  f"Points, ± the gap's standard error sqrt(se_a² + se_b²) (standard errors {kind}).", "",
                  "| variant | RL − Init | Init − SFT | sign pattern |", "|---|---|---|---|"]
        lines += [f"| {variant} | {signed(v['rl_minus_init'])} | {signed(v['init_minus_sft'])} | "
                  f"{'yes' if v['sign_pattern'] else 'no'} |" for variant, v in verdicts.items()]
        lines.append("")
    lines += [line for name in figures for line in (f"![{name}]({name})", "")] + ["## Last record per run", ""]
    lines += ["| run | module | stage | step | GFLOPs | " + " | ".join(variants) + " |",
              "|---" * (5 + len(variants)) + "|"]
    for run in runs:
        last = run.records[-1]
        cells = [percent(run.value(last, variant)) for variant in variants]
        lines.append(f"| {run.name} | {last.get('module')} | {last.get('stage')} | {last.get('step')} | "
                     f"{last['flops'] / 1e9:.4g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def make_report(runs: list[Path], out: Path, smooth: int = 0, seeds: int = 1, tests: bool = False) -> Path:
    """Write curves.png, bars.png, recognition.png (if any record has recognition) and report.md into ``out``;
    return report.md's path.

    Bars: Init is the first evaluation-only run (test records only, e.g. ``lit-sftrl test`` of the Init
    checkpoint), else the sanity record of the first run that has ``init_from``. SFT and RL are the first SFT and
    first RL run (in the order given); the matched budget is the smaller of their largest FLOPs, and each bar is
    that run's last record within the budget (+ MATCH_TOLERANCE), preferring stage test, then val, then sanity.
    With ``seeds`` N, the first N SFT runs and the first N RL runs are the seeds of their arm (the same recipe,
    seeded differently): SFT seed s and RL seed s meet at their own budget, and each bar is the seeds' mean with
    its standard error over seeds. With ``tests``, each SFT and RL bar is its run's last test record whatever
    its FLOPs: for runs whose compute was matched when they were made (``lit-sftrl study`` gives the continued
    SFT the steps its RL seed's FLOPs buy, up to one SFT step less, which at tiny sizes is more than
    MATCH_TOLERANCE). ``smooth`` > 1 smooths the curves (Savitzky-Golay, order 3).
    """
    if not runs:
        raise ValueError("no run directories given")
    if seeds < 1:
        raise ValueError(f"--seeds {seeds}: must be at least 1")
    loaded = [load_run(Path(path)) for path in runs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    variants = variants_of(loaded)
    budgets, picks = matched_compute(loaded, seeds, tests)
    used = [pick.run for arm in picks.values() for pick in arm]
    figures = [plot_curves(loaded, variants, out / "curves.png", smooth).name,
               plot_bars(scores_of(picks, variants), budgets, out / "bars.png", used).name]
    if recognition := variants_of(loaded, "recognition"):
        figures.append(plot_recognition(loaded, recognition, out / "recognition.png").name)
    else:
        (out / "recognition.png").unlink(missing_ok=True)
    report = out / "report.md"
    report.write_text(markdown(loaded, variants, budgets, picks, figures))
    return report
