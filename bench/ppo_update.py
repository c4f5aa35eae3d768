"""Where one PPO update spends its time: ``python -m bench.ppo_update [--path checkpoints/tiny-mllama]``.

Runs real PPO updates (GP-L, 16 environments, 64 attempts, 2 PPO epochs) through Lightning on the tiny default and
splits the wall time of the update phase into scoring forward, backward and optimizer step, from timers wrapped
around those calls in this script only (the trainer carries no instrumentation). Rollout time is reported apart:
``bench/rollout.py`` covers it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch

from bench.common import Row, format_table
from lit_sftrl.data.datamodules import RLDataModule
from lit_sftrl.data.tasks import TaskConfig
from lit_sftrl.models.backbone import Backbone, BackboneConfig, SamplingConfig
from lit_sftrl.training.ppo import PPOConfig, PPOModule

SECONDS: dict[str, float] = defaultdict(float)


def timed(name: str, function: Callable) -> Callable:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            SECONDS[name] += time.perf_counter() - start

    return wrapper


@contextmanager
def instrumented() -> Iterator[None]:
    """Time the backbone's and the optimizer's entry points for the duration of the block."""
    patches = [(Backbone, "generate"), (Backbone, "prompt_values"), (Backbone, "score"),
               (PPOModule, "manual_backward"), (PPOModule, "training_step"), (torch.optim.AdamW, "step")]
    originals = [getattr(owner, name) for owner, name in patches]
    for owner, name in patches:
        setattr(owner, name, timed(name, getattr(owner, name)))
    try:
        yield
    finally:
        for (owner, name), original in zip(patches, originals):
            setattr(owner, name, original)


def ppo_update_rows(path: str | None = None, updates: int = 2) -> list[Row]:
    with tempfile.TemporaryDirectory() as tmp:
        if path is None:
            from lit_sftrl.pretraining.corpus import build_tiny

            path = str(build_tiny(Path(tmp) / "tiny-mllama"))
        model = PPOModule(
            backbone=BackboneConfig(path=path), ppo=PPOConfig(ppo_epochs=2, minibatch_size=32, micro_batch_size=16),
            sampling=SamplingConfig(temperature=1.0, max_new_tokens=64),
        )
        data = RLDataModule(task=TaskConfig(name="gp_l"), num_envs=16, rollout_steps=64)
        trainer = L.Trainer(max_epochs=updates, logger=False, enable_checkpointing=False, limit_val_batches=0,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp)
        SECONDS.clear()
        with instrumented():
            trainer.fit(model, data)
    rollout = SECONDS["generate"] + SECONDS["prompt_values"]
    update = SECONDS["training_step"] - rollout  # the rollout runs inside training_step
    forward, backward, step = SECONDS["score"], SECONDS["manual_backward"], SECONDS["step"]
    return [
        Row(f"PPO update phase ({updates} updates)", update, "s", None),
        Row("  share in scoring forward", 100 * forward / update, "%", None),
        Row("  share in backward", 100 * backward / update, "%", None),
        Row("  share in forward + backward", 100 * (forward + backward) / update, "%", None),
        Row("  share in optimizer step", 100 * step / update, "%", None),
        Row(f"PPO rollout phase ({updates} updates)", rollout, "s", None),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", help="backbone directory (default: build a tiny Mllama in a temp dir)")
    parser.add_argument("--updates", type=int, default=2)
    args = parser.parse_args(argv)
    print(format_table(ppo_update_rows(args.path, args.updates)))


if __name__ == "__main__":
    main()
