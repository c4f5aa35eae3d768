"""FSDP2 sharding of the backbone under Lightning's ``ModelParallelStrategy`` (``configs/strategies/fsdp*.yaml``).

Every repeated layer (the language model's decoder layers, the vision tower's encoder layers) becomes its own
FSDP unit: its weights live sharded over the data-parallel ranks and are all-gathered just for its forward and
backward, then freed. The root model holds the rest (embeddings, output layer, norms, projector), and the value
head is a unit of its own (called outside the model's forward, and its gradients must be reduced like the rest).
Rollouts and evaluation (:func:`whole_weights`) all-gather every unit once and keep the whole model on each rank
while they generate: each rank then decodes its own environments at its own pace (the in-flight engine's slots,
answers of any length) with no collective per forward, which a sharded forward would need on every rank in step.
The cost: the whole model's weights (in the compute dtype) on every device during rollouts, the update's sharded
state beside them. PPO's update runs sharded: every rank takes the same number of forward/backward passes
(:func:`same_count_on_every_rank`); SFT's step runs a pass of each input kind (with images, text-only) that any
rank's batch holds (``SFTModule``). Under full fine-tuning the KL reference, a frozen copy of the model, is
sharded the same way and gathered whole only while the reference log-probs are computed, after the rollout's
whole weights are freed.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def repeated_layers(model: nn.Module) -> list[nn.Module]:
    """The members of every ``layers`` ModuleList (decoder and encoder layers of any family), outermost first."""
    return [layer for name, module in model.named_modules()
            if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers" for layer in module]


def shard_backbone(backbone: Any, mesh: Any, bf16: bool) -> None:
    """``fully_shard`` each repeated layer, then the root model and the value head, over ``mesh``; with ``bf16``
    the weights are all-gathered and computed in bfloat16 and gradients reduced in float32 (the sharded copy, the
    optimizer's, stays in the dtype it was loaded in). A frozen copy that is the KL reference (full fine-tuning)
    is sharded the same way: held whole, it would cost every rank a second model."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
              else MixedPrecisionPolicy())
    for model in (backbone.model, backbone.frozen_reference):
        if model is None:
            continue
        for layer in repeated_layers(model):
            fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
        fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    # LLaVA's output carries the projected image features as a view; lit-sftrl reads the logits (and the last
    # hidden state through a hook) and writes into no output in place, which is what the warning is about.
    warnings.filterwarnings("ignore",
                            message=r"FSDP2-wrapped module \(FSDP\w+ForConditionalGeneration\) returned a view")
    if backbone.value_head is not None:
        fully_shard(backbone.value_head, mesh=mesh, reshard_after_forward=True)  # fp32 always (see ValueHead)
        # Its output is a view (squeeze); nothing writes into it in place, which is what the warning is about.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPValueHead\) returned a view")


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def _units(module: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


@contextmanager
def whole_weights(module: nn.Module) -> Iterator[None]:
    """Inside, every rank holds the whole ``module`` (the backbone, or the KL reference's frozen copy; all-gathered
    once, on every rank together) and forwards without collectives; on exit each unit is sharded again. A no-op
    for an unsharded module."""
    units = _units(module)
    if not units:
        yield
        return
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


def same_count_on_every_rank(strategy: Any, count: int) -> int:
    """The most ``count`` of any rank: a sharded forward/backward is a collective, so every rank must run as many
    (a rank with fewer micro-batches runs extra ones that weigh nothing)."""
    if strategy.world_size == 1:
        return count
    return int(strategy.reduce(torch.tensor(float(count), device=strategy.root_device), reduce_op="max"))


def initialise_optimizer_state(optimizers: list[torch.optim.Optimizer]) -> None:
    """Give every parameter without optimizer state the state AdamW would create at its first step (step 0, zero
    moments): exactly what it would do later, done now. A distributed checkpoint's optimizer state must cover
    every parameter (torch fills a fresh optimizer's state for all of them before loading into it), and
    parameters that never receive a gradient (the vision tower on text-only tasks) would otherwise have none."""
    for optimizer in optimizers:
        optimizer = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer
        if not isinstance(optimizer, torch.optim.AdamW):
            continue
        for group in optimizer.param_groups:
            for param in group["params"]:
                if optimizer.state.get(param):
                    continue
                state = {"step": torch.tensor(0.0, dtype=torch.float32),
                         "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                         "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format)}
                if group.get("amsgrad"):
                    state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                optimizer.state[param] = state
