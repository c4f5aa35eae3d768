"""Supervised fine-tuning on expert episodes (SPEC §4): cross-entropy on the assistant's tokens only."""

from __future__ import annotations

from typing import Any

from lit_sftrl.policy import PolicyModule
from lit_sftrl.validation import LimitExceeded


class SFTModule(PolicyModule):
    """SFT LightningModule: batches of conversations are tokenised by the backbone's processor here.

    Args:
        backbone: the model (any local Hugging Face VLM directory; LoRA, quantisation, dtype).
        optim: optimizer and learning-rate schedule.
        eval_sampling: decoding for validation/test episodes (greedy by default).
        init_from: start from another run's weights (a Lightning checkpoint or an exported directory).
        max_nonfinite_losses: NaN/inf losses in a row after which the run stops (each one's step is skipped).
    """

    tokens_seen = 0  # trained-on tokens over all ranks; checkpointed

    def training_step(self, batch: list[dict[str, Any]], batch_idx: int):
        inputs = self.backbone.sft_batch([(sample["messages"], sample["image"]) for sample in batch])
        length = int(inputs["input_ids"].shape[-1])
        if length > self.backbone_config.max_tokens:  # one 5 MB turn once took the machine down with no message
            raise LimitExceeded(
                f"batch {batch_idx} holds a sample of {length} tokens, more than model.backbone.max_tokens="
                f"{self.backbone_config.max_tokens}: shorten the data or raise the limit"
            )
        loss, tokens = self.backbone.sft_loss(inputs)
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
