"""A Lightning callback for PPO tests that run in other processes (DDP): what each rank played and its weights.

After every update each rank appends one JSON line to ``<out>/rank<r>.jsonl``: the update, global step and
env steps, the first user message of every prompt of the update's first batched generation (its episodes),
each attempt's reward, (group, member) and advantage as the module computed them, and a SHA-256 of its
trainable weights. Pass it with
``--trainer.callbacks+='{"class_path": "ppo_rank_probe.PPORankProbe", "init_args": {"out": DIR}}'`` and
``tests/`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L
import torch


def weights_digest(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, value in sorted(module.backbone.trainable_state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class PPORankProbe(L.Callback):
    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self._first_prompts: list[str] | None = None
        self._attempts: dict[str, list] | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        encoder = pl_module.backbone.encoder
        encode_prompts = type(encoder).encode_prompts
        self._first_prompts = None

        # The rollout's first model input holds every environment's prompt (lockstep or in-flight alike).
        def recording_encode_prompts(prompts):
            if self._first_prompts is None:
                self._first_prompts = [messages[0]["content"] for messages, _ in prompts]
            return encode_prompts(encoder, prompts)

        encoder.encode_prompts = recording_encode_prompts  # an instance attribute shadows the method for this update

        advantages = type(pl_module)._advantages
        self._attempts = None

        def recording_advantages(attempts):
            result = advantages(pl_module, attempts)
            self._attempts = {"rewards": [a.reward for a in attempts],
                              "episodes": [[a.group, a.member] for a in attempts],
                              "advantages": result[0].tolist()}
            return result

        pl_module._advantages = recording_advantages

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        del pl_module.backbone.encoder.encode_prompts
        del pl_module._advantages
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "update": trainer.current_epoch,
            "global_step": trainer.global_step,
            "env_steps": pl_module.env_steps,
            "prompts": self._first_prompts,
            **(self._attempts or {}),
            "weights": weights_digest(pl_module),
        }
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / f"rank{trainer.global_rank}.jsonl", "a") as file:
            file.write(json.dumps(record) + "\n")
