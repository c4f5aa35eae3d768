"""Evaluation metrics over fixed episodes (docs/spec.md §6), each with its binomial standard error.

* ``success``: episodes solved within the attempt budget (GP) / routes completed (V-IRL route success).
* ``per_step_accuracy``: correct attempts / all attempts, retries counted (V-IRL's headline metric).
* ``per_step_accuracy_paper``: the same as the original code counted it: an episode that failed by using up an
  attempt budget counts one more wrong step (C / (A + 1) on a failed route). Compare with the paper using this.
* ``recognition``: cards read right on the first attempt (GP-VL).
* ``well_formed``: share of answers the environment could parse as its answer format.
* ``attempts``: mean attempts per episode.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torchmetrics import Metric

from lit_sftrl.core.statistics import binomial_stderr
from lit_sftrl.training.rollout import EpisodeResult


class EpisodeMetrics(Metric):
    """Sums over finished episodes; synchronised across ranks by torchmetrics before ``compute``."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("episodes", "successes", "attempts", "correct", "well_formed", "recognized",
                     "recognition_judged", "exhausted"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, results: Sequence[EpisodeResult]) -> None:
        for result in results:
            self.episodes += 1
            self.successes += result.success
            self.attempts += result.attempts
            self.correct += result.correct_attempts
            self.well_formed += result.well_formed_attempts
            self.exhausted += result.budget_exhausted
            if result.recognized is not None:
                self.recognition_judged += 1
                self.recognized += result.recognized

    def compute(self) -> dict[str, float]:
        episodes, attempts, judged = float(self.episodes), float(self.attempts), float(self.recognition_judged)
        rates = {
            "success": (float(self.successes), episodes),
            "per_step_accuracy": (float(self.correct), attempts),
            "per_step_accuracy_paper": (float(self.correct), attempts + float(self.exhausted)),
            "well_formed": (float(self.well_formed), attempts),
        }
        if judged:
            rates["recognition"] = (float(self.recognized), judged)
        metrics: dict[str, float] = {"episodes": episodes, "attempts": attempts / episodes if episodes else 0.0}
        for name, (hits, total) in rates.items():
            p = hits / total if total else 0.0
            metrics[name] = p
            metrics[f"{name}_stderr"] = binomial_stderr(p, total)
        return metrics


def write_results(path: Path, record: dict) -> None:
    """Write one evaluation record as JSON, atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(record, indent=2, sort_keys=True))
    temporary.replace(path)


def summary_line(stage: str, step: int, metrics: dict[str, dict[str, float]]) -> str:
    """One human-readable line per evaluation, e.g. for the start and end of a fit."""
    parts = [
        f"{variant}: success {m['success']:.3f}±{m['success_stderr']:.3f}, well-formed {m['well_formed']:.3f}"
        + (f", per-step {m['per_step_accuracy']:.3f}" if "per_step_accuracy" in m else "")
        + (f", recognition {m['recognition']:.3f}" if "recognition" in m else "")
        for variant, m in metrics.items()
    ]
    return f"[{stage} @ step {step}] " + " | ".join(parts)
