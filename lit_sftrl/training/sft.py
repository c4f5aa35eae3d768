"""Supervised fine-tuning on expert episodes: cross-entropy on the assistant's tokens only (:func:`sft_loss`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lit_sftrl.core.validation import LimitExceeded
from lit_sftrl.models.encoding import IGNORE
from lit_sftrl.training.policy import PolicyModule


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The whole SFT objective: mean token cross-entropy (fp32) over the labelled tokens, the assistant's answers;
    prompts, earlier turns of a multi-turn sample and padding carry the label IGNORE."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)


class SFTModule(PolicyModule):
    """SFT LightningModule: batches of conversations are tokenised by the backbone's processor here.

    Args:
        backbone: the model (any local Hugging Face VLM directory; LoRA, quantisation, dtype).
        optim: optimizer and learning-rate schedule.
        eval_sampling: decoding for validation/test episodes (greedy by default).
        init_from: start from another run's weights (a Lightning checkpoint or an exported directory).
        compute: how FLOPs are counted (real tokens, or the paper's approximation with 1,600 tokens per image).
        max_nonfinite_losses: NaN/inf losses in a row after which the run stops (each one's step is skipped).
        save_transcripts: write each evaluation's transcripts (prompt, answer, feedback, reward per attempt).
    """

    tokens_seen = 0  # trained-on tokens over all ranks; checkpointed

    def training_step(self, batch: list[dict[str, Any]], batch_idx: int):
        # A model input holds images for all its rows or for none, and LLaVA-style files mix image and text-only
        # samples: each kind goes through the model on its own, and the loss is the mean over all labelled
        # tokens of the batch, as one mixed forward pass would give.
        losses, labelled, tokens = [], 0, 0
        for group, stand_in in self._forward_groups(batch):
            inputs = self.backbone.sft_batch(
                [(sample["messages"], sample["image"]) for sample in group],
                all_turns=[sample.get("assistant_turns") == "all" for sample in group],
            )
            length = int(inputs["input_ids"].shape[-1])
            if length > self.backbone_config.max_tokens:  # one 5 MB turn once took the machine down with no message
                raise LimitExceeded(
                    f"batch {batch_idx} holds a sample of {length} tokens, more than model.backbone.max_tokens="
                    f"{self.backbone_config.max_tokens}: shorten the data or raise the limit"
                )
            logits, labels, group_tokens = self.backbone.label_logits(inputs)
            if stand_in:  # in the graph (its backward's collectives too), weighing nothing
                losses.append(sft_loss(logits, labels) * 0.0)
                continue
            count = int((labels != IGNORE).sum())
            losses.append(sft_loss(logits, labels) * count)
            labelled, tokens = labelled + count, tokens + group_tokens
        loss = torch.stack(losses).sum() / max(labelled, 1)
        if not self.loss_is_finite(loss):
            return None  # Lightning skips the optimizer step
        tokens = int(self.trainer.strategy.reduce(loss.new_tensor(tokens), reduce_op="sum"))
        self.flops.add_training(tokens)
        self.tokens_seen += tokens
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({"train/tokens": float(self.tokens_seen), "train/flops": self.flops.total}, rank_zero_only=True)
        return loss

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.tokens_seen = checkpoint.get("tokens_seen", 0)


    def _forward_groups(self, batch: list[dict[str, Any]]) -> list[tuple[list[dict[str, Any]], bool]]:
        """The forward passes of a step, each ``(samples, stand_in)``: the batch's samples with an image, then
        those without. Sharded (FSDP2), a forward is a sequence of collectives (each layer's all-gather; the
        vision tower's only with images) that every rank must enter together: every rank runs a pass of each kind
        that any rank's batch holds, a rank without that kind a stand-in (its first sample with a blank image, or
        without its image) whose loss is multiplied by zero."""
        with_image = [sample for sample in batch if sample["image"] is not None]
        text_only = [sample for sample in batch if sample["image"] is None]
        if self.device_mesh is None:  # unsharded (DDP included): nothing waits on another rank's forward
            return [(group, False) for group in (with_image, text_only) if group]
        strategy, groups = self.trainer.strategy, []
        for group, stand_in_image in ((with_image, BLANK_IMAGE), (text_only, None)):
            on_any_rank = strategy.reduce_boolean_decision(bool(group), all=False)  # every rank asks, in this order
            if group:
                groups.append((group, False))
            elif on_any_rank:
                groups.append(([{**batch[0], "image": stand_in_image}], True))
        return groups


# What a stand-in pass feeds the vision tower (the processor resizes it to the model's input).
BLANK_IMAGE = np.zeros((32, 32, 3), dtype=np.uint8)
