"""What the SFT and PPO LightningModules share: the backbone, compute accounting, checkpoints, evaluation.

Checkpoints hold only what training changes (``Backbone.trainable_state_dict``: LoRA adapters and value head
under LoRA, everything under full fine-tuning) plus the FLOPs counter; the base weights stay in the
backbone directory. Evaluation plays the datamodule's fixed episodes with the rollout engine.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lit_sftrl.core.compute import ComputeConfig, FlopsCounter
from lit_sftrl.core.validation import check_values, validate
from lit_sftrl.data.episodes import EvalEpisodes
from lit_sftrl.data.tasks import make_env_from_spec
from lit_sftrl.models.backbone import Backbone, BackboneConfig, SamplingConfig
from lit_sftrl.models.export import inherited_flops, load_weights_for_init, pack_state, unpack_state
from lit_sftrl.pretraining.corpus import ensure_backbone
from lit_sftrl.run.checkpoint_io import use_configured_optimizer_settings
from lit_sftrl.run.finite import (
    LastFiniteState,
    last_saved_checkpoint,
    nonfinite_weights_message,
    save_stop_checkpoint,
    trainable_weights_finite,
)
from lit_sftrl.run.progress import eval_attempts
from lit_sftrl.run.run_dir import run_directory
from lit_sftrl.training.evaluation import EpisodeMetrics, summary_line, write_results
from lit_sftrl.training.rollout import RolloutEngine
from lit_sftrl.training.sharding import initialise_optimizer_state, shard_backbone, whole_weights
from lit_sftrl.training.transcripts import EpisodeTranscript, transcript_path, write_transcripts


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and an optional cosine decay, stepped once per optimizer step.

    Args:
        lr: peak learning rate (paper: 1e-6 for PPO, 1e-7 for V-IRL-VL; SFT 1e-6 on the 11B model).
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        warmup_steps: optimizer steps of linear warm-up from 0.
        schedule: ``constant`` after warm-up, or ``cosine`` decay to ``min_lr_ratio * lr`` at the last step.
        min_lr_ratio: floor of the cosine schedule, relative to ``lr``.
    """

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        validate(self, "optim")

    def factor(self, step: int, total_steps: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule != "cosine" or total_steps <= self.warmup_steps:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / (total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class PolicyModule(L.LightningModule):
    """Base LightningModule: one backbone, cumulative FLOPs, trainable-only checkpoints, evaluation steps. Its
    arguments are documented on the modules the CLI builds (:class:`~lit_sftrl.training.sft.SFTModule`, PPOModule)."""

    uses_reference = False  # whether training needs the reference policy's log-probs (PPO's KL term)

    def __init__(
        self,
        backbone: BackboneConfig | None = None,
        optim: OptimConfig | None = None,
        eval_sampling: SamplingConfig | None = None,
        init_from: str | None = None,
        compute: ComputeConfig | None = None,
        max_nonfinite_losses: int = 5,
        save_transcripts: bool = False,
    ) -> None:
        super().__init__()
        # Evaluation transcripts (prompt, answer, feedback, reward per attempt) beside each record:
        # lit_sftrl.training.transcripts
        self.save_transcripts = save_transcripts
        self._transcripts: list[EpisodeTranscript] = []
        self._eval_cap = {"answers": 0, "at_cap": 0}
        self.backbone_config = backbone or BackboneConfig()
        self.optim = optim or OptimConfig()
        self.eval_sampling = eval_sampling or SamplingConfig(temperature=0.0)
        self.init_from = init_from
        self.compute = compute or ComputeConfig()
        check_values("model.", max_nonfinite_losses=max_nonfinite_losses)
        self.max_nonfinite_losses = max_nonfinite_losses
        self._nonfinite_in_a_row = 0
        self._last_finite = LastFiniteState()  # lit_sftrl.run.finite: what it copies, and where
        self.save_hyperparameters({"backbone": asdict(self.backbone_config), "init_from": init_from})
        self.backbone: Backbone | None = None
        self.flops: FlopsCounter | None = None
        # One per variant the datamodule evaluates (any names an environment gives), made on first use.
        self.eval_metrics: dict[str, EpisodeMetrics] = {}
        self._eval_envs: dict[str, list] = {}
        self._eval_task: str | None = None
        self._checkpoint_step = 0  # validate/test restore weights, not the step: keep the checkpoint's for records
        # Checkpoints hold trainable weights only; on_load_checkpoint loads them strictly itself.
        self.strict_loading = False

    # ------------------------------------------------------------------------------------ model

    def prepare_data(self) -> None:
        # Runs once per node before any rank builds the model: the tiny default is built here on first use.
        ensure_backbone(self.backbone_config.path)

    def configure_model(self) -> None:
        if self.backbone is not None:
            return
        self.backbone = Backbone(self.backbone_config)
        self.backbone.tokens_per_image = self.compute.tokens_per_image
        self.flops = FlopsCounter(self.backbone.num_parameters)
        # An exported run keeps its compute: evaluating or training it continues that run's FLOPs axis.
        self.flops.initial = inherited_flops(self.backbone_config.path)
        if self.init_from:
            load_weights_for_init(self.backbone, self.init_from)
            self.flops.initial = inherited_flops(self.init_from)
            if self.uses_reference:  # the KL anchors at the run it starts from, not at the base model
                self.backbone.anchor_reference()
        if self.device_mesh is not None:  # ModelParallelStrategy (FSDP2): shard once the weights are in place
            if self.uses_reference:  # a frozen copy (full fine-tuning) is sharded with the model: made now
                self.backbone.prepare_reference()
            bf16 = "bf16" in str(self.trainer.precision) and self.trainer.strategy.root_device.type == "cuda"
            shard_backbone(self.backbone, self.device_mesh["data_parallel"], bf16=bf16)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(
            self.parameter_groups(), lr=self.optim.lr, betas=self.optim.betas, weight_decay=self.optim.weight_decay
        )
        total = self.total_optimizer_steps()
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.optim.factor(step, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_fit_start(self) -> None:
        if self.device_mesh is not None:  # a distributed checkpoint needs optimizer state for every parameter
            initialise_optimizer_state(self.trainer.optimizers)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups (each may set its own ``lr``); the schedule scales every group alike."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def total_optimizer_steps(self) -> int:
        return int(self.trainer.estimated_stepping_batches)

    def loss_is_finite(self, loss: torch.Tensor) -> bool:
        """False for a NaN/inf loss, whose step the caller skips; too many in a row stop the run, saved.

        Decided across ranks (any rank's NaN skips the step everywhere), so DDP never waits on a skipped backward.
        """
        finite = bool(torch.isfinite(loss.detach()).all())
        if not self.trainer.strategy.reduce_boolean_decision(not finite, all=False):
            self._nonfinite_in_a_row = 0
            return True
        self._nonfinite_in_a_row += 1
        rank_zero_warn(
            f"non-finite loss at step {self.global_step}: step skipped ({self._nonfinite_in_a_row} in a row)"
        )
        if self._nonfinite_in_a_row >= self.max_nonfinite_losses:
            path = self.stop_checkpoint
            save_stop_checkpoint(self.trainer, path)
            raise FloatingPointError(
                f"{self._nonfinite_in_a_row} non-finite losses in a row at step {self.global_step}: stopped. "
                f"State saved to {path}; lower the learning rate or check the data, then resume with --ckpt_path."
            )
        return False

    # A step with a finite loss can still leave non-finite weights (an overflowing update, a huge learning rate).
    # They are caught right after the step, before any checkpoint callback runs, and never saved: the state from
    # before the step (captured by LastFiniteState) is put back and saved as nonfinite-stop.ckpt instead.
    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, *args: Any, **kwargs: Any) -> None:
        self._last_finite.capture(getattr(optimizer, "optimizer", optimizer), self.backbone)
        super().optimizer_step(epoch, batch_idx, optimizer, *args, **kwargs)
        self.stop_on_nonfinite_weights(self.global_step + 1)  # Lightning counts the step once this hook returns

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Manual optimisation (PPO) steps many times inside training_step, between rollouts that move the
        # environments on: no single earlier state to go back to, so the run stops naming its last checkpoint.
        self.stop_on_nonfinite_weights(self.global_step)

    def stop_on_nonfinite_weights(self, step: int) -> None:
        if self.backbone is None or not self.trainer.strategy.reduce_boolean_decision(
            not trainable_weights_finite(self.backbone), all=False
        ):
            return
        saved = None
        if self.automatic_optimization and self._last_finite.captured:
            self._last_finite.restore(self.trainer.optimizers[0])
            saved = self.stop_checkpoint
            save_stop_checkpoint(self.trainer, saved)
        last = last_saved_checkpoint(self.trainer)
        raise FloatingPointError(nonfinite_weights_message(step, saved and str(saved), last))

    @property
    def run_dir(self) -> Path:
        """Where this run's outputs live: the logger's directory (``checkpoints/<run>`` in the configs)."""
        return run_directory(self.trainer)

    @property
    def stop_checkpoint(self) -> Path:
        """Where a run stopped by non-finite losses or weights saves its state."""
        return self.run_dir / "checkpoints" / "nonfinite-stop.ckpt"

    # ------------------------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not trainable_weights_finite(self.backbone):  # the last guard: a checkpoint never holds NaN weights
            raise FloatingPointError(
                nonfinite_weights_message(self.global_step, None, last_saved_checkpoint(self.trainer))
            )
        # Sharded (FSDP2), the strategy's own state_dict stays: every rank writes its shards of the whole module
        # into a distributed checkpoint, which the strategy loads back into the sharded module itself.
        if self.device_mesh is None:
            checkpoint["state_dict"] = pack_state(self.backbone)
        checkpoint["flops"] = self.flops.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.configure_model()
        if self.device_mesh is None:  # sharded, the strategy has loaded the weights already
            self.backbone.load_trainable_state_dict(unpack_state(checkpoint["state_dict"]))
        use_configured_optimizer_settings(checkpoint, [  # a resume takes the config's learning rate
            {"lr": group.get("lr", self.optim.lr), "weight_decay": self.optim.weight_decay, "betas": self.optim.betas}
            for group in self.parameter_groups()
        ])
        self.flops.load_state_dict(checkpoint.get("flops", {}))
        self._checkpoint_step = int(checkpoint.get("global_step", 0))

    # ------------------------------------------------------------------------------------ evaluation

    def validation_step(self, batch: EvalEpisodes, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate_chunk(batch)

    def test_step(self, batch: EvalEpisodes, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate_chunk(batch)

    def on_validation_epoch_end(self) -> None:
        self._finish_evaluation("sanity" if self.trainer.sanity_checking else "val")

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation("test")

    def _evaluate_chunk(self, chunk: EvalEpisodes) -> None:
        envs = self._eval_envs.get(chunk.variant)
        if envs is None or len(envs) < len(chunk.episodes):
            envs = [make_env_from_spec(chunk.env_id, chunk.env_kwargs, chunk.wrappers) for _ in chunk.episodes]
            self._eval_envs[chunk.variant] = envs
        self._eval_task = chunk.task
        engine = RolloutEngine(self.backbone, self.eval_sampling, keep_transcripts=self.save_transcripts)
        before = dict(self.backbone.cap_counts)
        with whole_weights(self.backbone):  # sharded: each rank plays its episodes at its own pace
            results = engine.evaluate(envs, chunk.episodes, on_attempts=eval_attempts(self._trainer))
        for key in self._eval_cap:
            self._eval_cap[key] += self.backbone.cap_counts[key] - before[key]
        if chunk.variant not in self.eval_metrics:
            self.eval_metrics[chunk.variant] = EpisodeMetrics().to(self.device)
        self.eval_metrics[chunk.variant].update(results)
        if self.save_transcripts:
            self._transcripts += [
                EpisodeTranscript(chunk.variant, int(seed), dict(options or {}), bool(result.success),
                                  list(result.transcript or []))
                for (seed, options), result in zip(chunk.episodes, results)
            ]

    def _warn_if_answers_hit_the_cap(self) -> None:
        """validate/test: most answers running into max_new_tokens means they were cut off, not wrong (a real model
        thinks aloud before its answer; the paper allows 512 tokens)."""
        answers, capped = self._eval_cap["answers"], self._eval_cap["at_cap"]
        self._eval_cap = {"answers": 0, "at_cap": 0}
        if answers and capped / answers >= 0.5 and self.trainer.state.fn in ("validate", "test"):
            rank_zero_warn(
                f"{capped} of {answers} evaluation answers hit the cap eval_sampling.max_new_tokens="
                f"{self.eval_sampling.max_new_tokens} and were cut off: raise --model.init_args.eval_sampling."
                "max_new_tokens (the paper allows 512)"
            )

    def _finish_evaluation(self, stage: str) -> None:
        metrics = {}
        for variant, metric in self.eval_metrics.items():
            if metric.update_called:
                metrics[variant] = metric.compute()
                metric.reset()
        if not metrics:
            return
        flat = {f"{stage}/{v}/{k}": value for v, m in metrics.items() for k, value in m.items()}
        if stage != "sanity":  # Lightning discards what is logged during the sanity check
            self.log_dict(flat, sync_dist=False, rank_zero_only=True)
        step = max(self.global_step, self._checkpoint_step)
        self.print(summary_line(stage, step, metrics))
        run_dir = self.run_dir  # on every rank: trainer.log_dir is a collective under DDP
        if self.trainer.is_global_zero:
            record = {
                "stage": stage, "step": step, "epoch": self.current_epoch,
                "flops": self.flops.total, "checkpoint": self.trainer.ckpt_path, "metrics": metrics,
                "variants": list(metrics),  # the task's order (the file's keys are sorted)
                "module": type(self).__name__, "init_from": self.init_from, "task": self._eval_task,
                "compute_mode": self.compute.mode,
            }
            name = f"{stage}-step{step:07d}.json"
            write_results(run_dir / "eval" / name, record)
            if self.save_transcripts:
                write_transcripts(transcript_path(run_dir / "eval" / name), self._transcripts)
        self._transcripts = []
        self._warn_if_answers_hit_the_cap()
