"""Non-finite weights: detected after each optimizer step like non-finite losses, and never checkpointed."""

from __future__ import annotations

from typing import Any

import torch


def trainable_weights_finite(backbone: Any) -> bool:
    """True when every trainable parameter is finite; one device sync whatever the number of tensors (the
    largest magnitude of each, stacked: a NaN or inf anywhere makes it non-finite, and no sum can overflow)."""
    params = [p.detach() for p in backbone.parameters() if p.requires_grad and p.numel()]
    if not params:
        return True
    return bool(torch.isfinite(torch.stack([p.abs().amax().float() for p in params])).all())


def nonfinite_weights_message(trainer: Any, step: int) -> str:
    """One line: what happened, that nothing was saved from it, and where the last finite state is."""
    last = last_saved_checkpoint(trainer)
    where = (
        f"the last checkpoint, {last}, holds finite weights: lower the learning rate (or check the data) and "
        f"resume with --ckpt_path {last}"
        if last
        else "no checkpoint had been written yet: lower the learning rate and start again"
    )
    return (f"the weights turned non-finite (NaN/inf) at step {step} although the loss was finite: "
            f"stopped, nothing was saved from this state; {where}.")


def last_saved_checkpoint(trainer: Any) -> str | None:
    for callback in trainer.checkpoint_callbacks:
        path = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
        if path:
            return path
    return None
