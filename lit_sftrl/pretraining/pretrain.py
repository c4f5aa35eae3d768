"""``lit-sftrl pretrain``: the tiny model, then a plain Lightning fit on the skills corpus.

The base is the tiny default (same builder, same tokenizer rule, same initial weights for the same seed) after
causal-LM training on :mod:`lit_sftrl.pretraining.skills`: answers only, as in SFT, through the project's own
:class:`~lit_sftrl.training.sft.SFTModule`. It is written, like the tiny default, as a plain Hugging Face directory
(atomically: a temporary sibling renamed into place), so configs name it as ``--model.backbone.path``.

Determinism: batch ``b`` is a pure function of ``(seed, b)`` and CPU training in one thread is reproducible,
so the same config gives byte-identical weights as long as the run completes ``max_steps``. ``max_minutes``
is a safety cap: a run it stops is recorded as such (``stopped_by_time`` in ``lit_sftrl_base.json``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from itertools import count
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, IterableDataset

from lit_sftrl.pretraining.skills import IMAGE_SKILLS, SkillsConfig, item_skill, skill_item

RECORD = "lit_sftrl_base.json"


@dataclass
class PretrainConfig:
    """One pretraining run: the ``base`` of ``lit-sftrl pretrain`` (``configs/pretrain_base.yaml`` holds the defaults).

    Args:
        out: the base model directory to write (left untouched when it exists).
        family: the tiny model built first (as ``make-tiny --family``).
        size: its size (as ``make-tiny --size``).
        seed: its initial weights (as ``make-tiny --seed``); also seeds the batches.
        skills: the corpus (size, image share, mix).
        batch_size: conversations per optimizer step.
        lr: AdamW peak learning rate.
        warmup_steps: linear warm-up steps.
        min_lr_ratio: the cosine decay's floor, a share of ``lr``.
        max_steps: optimizer steps (the cosine schedule spans them).
        max_minutes: wall-clock cap on the fit; 0 = none.
        threads: torch intra-op threads (1 is fastest for tiny models on a shared machine).
        log_every: steps between logged losses.
    """

    out: str = "checkpoints/tiny-mllama-base"
    family: str = "mllama"
    size: str = "tiny"
    seed: int = 0
    skills: SkillsConfig = field(default_factory=SkillsConfig)
    batch_size: int = 16
    lr: float = 1.0e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    max_steps: int = 1600
    max_minutes: float = 35.0
    threads: int = 1
    log_every: int = 25


class SkillBatches(IterableDataset):
    """Endless batches of corpus items; batch ``b`` is drawn from ``(seed, b)`` only. A batch is all-image or
    all-text (what one model forward takes), image batches making up ``image_share`` of the stream."""

    def __init__(self, skills: SkillsConfig, batch_size: int, seed: int) -> None:
        self.skills, self.batch_size, self.seed = skills, batch_size, seed
        kinds = np.array([item_skill(skills, i) in IMAGE_SKILLS for i in range(skills.size)])
        self.pools = {True: np.flatnonzero(kinds), False: np.flatnonzero(~kinds)}

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        for batch in count():
            rng = np.random.default_rng([self.seed, 7, batch])
            images = bool(rng.random() < self.skills.image_share) and len(self.pools[True]) > 0
            pool = self.pools[images if len(self.pools[False]) else True]
            yield [skill_item(self.skills, int(i)) for i in rng.choice(pool, size=self.batch_size)]


def pretrain_base(config: PretrainConfig) -> Path:
    """Build the tiny model, fit it on the skills corpus, write the base to ``config.out``; return the path."""
    import lightning as L
    import torch
    from lightning.pytorch.loggers import CSVLogger

    from lit_sftrl.models.config import BackboneConfig
    from lit_sftrl.pretraining.corpus import build_tiny
    from lit_sftrl.run.progress import RunProgressBar
    from lit_sftrl.training.policy import OptimConfig
    from lit_sftrl.training.sft import SFTModule

    out = Path(config.out)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.threads)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        init = build_tiny(tmp / "init", family=config.family, size=config.size, seed=config.seed)
        L.seed_everything(config.seed, workers=True, verbose=False)
        module = SFTModule(
            backbone=BackboneConfig(path=str(init)),
            optim=OptimConfig(lr=config.lr, warmup_steps=config.warmup_steps, schedule="cosine",
                              min_lr_ratio=config.min_lr_ratio),
        )
        data = DataLoader(SkillBatches(config.skills, config.batch_size, config.seed), batch_size=None,
                          collate_fn=lambda batch: batch)
        trainer = L.Trainer(
            accelerator="cpu", devices=1, precision="32-true", max_steps=config.max_steps,
            max_time={"minutes": config.max_minutes} if config.max_minutes else None, gradient_clip_val=1.0,
            # a run shorter than log_every still logs its last step (the record copies the metrics it wrote)
            logger=CSVLogger(tmp, name="", version="log"), log_every_n_steps=min(config.log_every, config.max_steps),
            enable_checkpointing=False, enable_model_summary=False,
            callbacks=[RunProgressBar()],  # the CLI's progress: a bar on a terminal, periodic lines in a log
            limit_val_batches=0, num_sanity_val_steps=0,
        )
        wall, cpu = time.time(), time.process_time()
        trainer.fit(module, train_dataloaders=data)
        wall, cpu = time.time() - wall, time.process_time() - cpu
        final = tmp / "base"
        module.backbone.model.save_pretrained(final)
        module.backbone.processor.save_pretrained(final)
        shutil.copy(tmp / "log" / "metrics.csv", final / "pretrain_metrics.csv")
        record = {
            "config": asdict(config), "steps": trainer.global_step,
            "stopped_by_time": trainer.global_step < config.max_steps,
            "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "tokens": module.tokens_seen,
            "final_loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
        }
        (final / RECORD).write_text(json.dumps(record, indent=1) + "\n")
        try:
            os.rename(final, out)
        except OSError:
            if not out.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
