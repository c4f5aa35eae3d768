"""A Lightning callback for benches that run ``lit-sftrl fit``: where a run's resident memory stands once imports,
model and optimizer are set up (before the first step), and its high-water mark once the first rollout has played
(before the first update), written to ``out`` as JSON (MiB) when training ends. ``bench.peers`` sets them against
the run's peak. A module of its own so that the systems measured beside lit-sftrl (TRL) never import Lightning."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L

from bench.common import peak_rss_mb, rss_mb


class LoadedMemory(L.Callback):
    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.figures: dict[str, float] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.figures = {"loaded_rss_mb": rss_mb()}
        rollout = type(pl_module)._rollout

        def measured_rollout(spec):  # an instance attribute shadows the method: the first rollout, then unwrapped
            result = rollout(pl_module, spec)
            self.figures["peak_after_rollout_mb"] = peak_rss_mb()
            del pl_module._rollout
            return result

        pl_module._rollout = measured_rollout

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out.write_text(json.dumps(self.figures))
