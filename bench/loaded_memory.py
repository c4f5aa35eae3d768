"""A Lightning callback for benches that run ``lit-sftrl fit``: the resident memory once imports, model and
optimizer are set up, before the first step, written to ``out`` (MiB, JSON). ``bench.peers`` compares it with the
run's peak. A module of its own so that the systems measured beside lit-sftrl (TRL) never import Lightning."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L

from bench.common import rss_mb


class LoadedMemory(L.Callback):
    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out.write_text(json.dumps(rss_mb()))
