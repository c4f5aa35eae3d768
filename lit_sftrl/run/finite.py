"""Non-finite weights: detected after each optimizer step like non-finite losses; the run stops with a checkpoint
of the last finite state (the one before the step), never of the non-finite one.

To save the state before the step, :class:`LastFiniteState` copies the trainable parameters and their optimizer
state before every optimizer step. Only what the step changes is copied (frozen base weights under LoRA never
are), into buffers allocated once. Where the copy lives is the memory trade-off: when the trainable parameters
are a small part of the model (LoRA adapters, a value head: well under 10% of its parameters) the copy stays on
their device, a few MB copied at device speed; when they are most of it (full fine-tuning), a second copy of the
weights and the optimizer moments would not fit beside them on an accelerator, so it goes to host memory (pinned
on CUDA, copied asynchronously in stream order: the step's kernels run after the copy, no host sync). That is
one device-to-host copy of about 3x the trainable bytes per step; CPU training pays a memory copy.
"""

from __future__ import annotations

from typing import Any

import torch

DEVICE_SNAPSHOT_FRACTION = 0.1  # trainable share of all parameters up to which the copy stays on the device


def trainable_weights_finite(backbone: Any) -> bool:
    """True when every trainable parameter is finite; one device sync whatever the number of tensors (the
    largest magnitude of each, stacked: a NaN or inf anywhere makes it non-finite, and no sum can overflow)."""
    # Sharded (FSDP2 DTensors), each rank checks its own shard: the callers decide across ranks.
    params = [_local(p.detach()) for p in backbone.parameters() if p.requires_grad]
    params = [p for p in params if p.numel()]
    if not params:
        return True
    return bool(torch.isfinite(torch.stack([p.abs().amax().float() for p in params])).all())


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class LastFiniteState:
    """The optimizer's parameters and per-parameter state as they were before its latest step (see the module
    docstring for where the copy lives and why)."""

    def __init__(self) -> None:
        self._params: list[torch.Tensor] = []
        self._states: list[dict[str, Any]] = []
        self._on_host: bool | None = None

    def capture(self, optimizer: torch.optim.Optimizer, module: torch.nn.Module) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            # DeepSpeed's ZeRO optimizers keep fp32 master weights of their own, which copying the module's
            # parameters would not put back: nothing is captured, and the stop names the last checkpoint.
            self._params, self._states = [], []
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self._on_host is None:
            trainable = sum(p.numel() for p in params)
            total = sum(p.numel() for p in module.parameters())
            self._on_host = trainable > DEVICE_SNAPSHOT_FRACTION * max(total, 1)
        if len(self._params) != len(params):
            self._params = [self._buffer(p) for p in params]
            self._states = [{} for _ in params]
        with torch.no_grad():
            for buffer, param, saved in zip(self._params, params, self._states):
                buffer.copy_(param.detach(), non_blocking=True)
                state = optimizer.state.get(param, {})
                for key in [k for k in saved if k not in state]:
                    del saved[key]
                for key, value in state.items():
                    if not torch.is_tensor(value):
                        saved[key] = (value, None)
                        continue
                    copy = saved.get(key, (None, None))[0]
                    if not torch.is_tensor(copy) or copy.shape != value.shape or copy.dtype != value.dtype:
                        copy = self._buffer(value)
                    copy.copy_(value, non_blocking=True)
                    saved[key] = (copy, value.device)  # AdamW keeps its step count on the CPU, fused Adam does not

    def restore(self, optimizer: torch.optim.Optimizer) -> None:
        """Put the captured parameters and optimizer state back in place (the optimizer's learning rates are not
        touched: the scheduler steps after the optimizer, so they are still the captured step's)."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if len(params) != len(self._params):
            raise RuntimeError("no state was captured before this optimizer step")
        with torch.no_grad():
            for buffer, param, saved in zip(self._params, params, self._states):
                param.copy_(buffer.to(param.device))
                if saved:
                    optimizer.state[param] = {
                        key: value.to(device, copy=True) if device is not None else value
                        for key, (value, device) in saved.items()
                    }
                else:  # captured before the optimizer's first step: it had no state yet
                    optimizer.state.pop(param, None)

    @property
    def captured(self) -> bool:
        return bool(self._params)

    def _buffer(self, like: torch.Tensor) -> torch.Tensor:
        if not self._on_host or like.device.type == "cpu":
            return torch.empty_like(like)
        return torch.empty_like(like, device="cpu", pin_memory=like.is_cuda)


def nonfinite_weights_message(step: int, saved: str | None, last: str | None) -> str:
    """One line: what happened, what was saved, and how to go on."""
    if saved:
        where = (f"the state before that step is saved to {saved}: lower the learning rate (or check the data) and "
                 f"resume with --ckpt_path {saved}")
    elif last:
        where = (f"nothing was saved from this state; the last checkpoint, {last}, holds finite weights: lower the "
                 f"learning rate (or check the data) and resume with --ckpt_path {last}")
    else:
        where = "nothing was saved from this state and no checkpoint had been written yet: lower the learning rate " \
                "and start again"
    return f"the weights turned non-finite (NaN/inf) at step {step} although the loss was finite: stopped; {where}."


def last_saved_checkpoint(trainer: Any) -> str | None:
    for callback in trainer.checkpoint_callbacks:
        path = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
        if path:
            return path
    return None


def save_stop_checkpoint(trainer: Any, path: Any) -> None:
    """Save the trainer's state to ``path`` from inside an optimizer step, recorded as of the end of the last
    completed batch (as Lightning's own step checkpoints are): resuming from it repeats the stopped step's batch,
    with the learning rate the resumed config gives."""
    from lit_sftrl.run.checkpoint_io import _as_if_saved_at_batch_end

    with _as_if_saved_at_batch_end(trainer):
        trainer.save_checkpoint(path)
