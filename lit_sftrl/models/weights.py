"""Weight plumbing between the wrapper's parameter names, plain Hugging Face names and peft adapters.

Names inside the wrapper look like ``model.base_model.model.<hf name with .base_layer>`` under LoRA and
``model.<hf name>`` under full fine-tuning; :func:`canonical_name` maps both to the plain Hugging Face name, so
weights move between LoRA and full fine-tuning runs and exported directories. A module of LoRA's
``modules_to_save`` holds its frozen original (``.original_module.``) and a trainable copy per adapter
(``.modules_to_save.<adapter>.``): both map to the plain name; the copies, like the adapters' own weights, are
also matched by their exact name.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator

import torch
from torch import nn

VALUE_HEAD_PREFIX = "value_head."
_PEFT_PREFIX = "base_model.model."
REFERENCE_ADAPTER = "reference"
_PEFT_WRAPPERS = re.compile(r"\.(base_layer|original_module|modules_to_save\.[^.]+)\.")


def canonical_name(name: str) -> str:
    """Backbone parameter name (full fine-tuning or peft) -> the plain Hugging Face name. Plain Hugging Face
    names must be given the wrapper's ``model.`` prefix first."""
    if name.startswith("model."):
        name = name[len("model.") :]
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX) :]
    return unwrapped_name(name)


def unwrapped_name(name: str) -> str:
    """``name`` without peft's wrapper levels (a LoRA layer's base layer, a saved module's original or copy)."""
    return _PEFT_WRAPPERS.sub(".", name)


def is_adapter_key(name: str) -> bool:
    """A weight peft adds (a LoRA matrix, the trainable copy of a saved module): it has no base counterpart."""
    return ".lora_" in name or is_saved_copy_key(name)


def is_saved_copy_key(name: str, adapter: str | None = None) -> bool:
    """A weight of the trainable copy of a ``modules_to_save`` module (of ``adapter``, or of any adapter)."""
    return f".modules_to_save.{adapter}." in name if adapter is not None else ".modules_to_save." in name


def merged_state_dict(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with every LoRA delta added to its layer, under plain Hugging Face names; tied
    weights stay one tensor. Nothing is modified in place (peft's merge/unmerge would perturb the live weights by
    rounding)."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    adapter = peft_model.active_adapter
    deltas = {
        f"{name}.weight": module.get_delta_weight(adapter).detach()
        for name, module in base.named_modules()
        if isinstance(module, LoraLayer) and adapter in module.lora_A
    }
    merged = {}
    # Tied weights (input and output embeddings) are one tensor under two names: keep them one tensor, so that
    # save_pretrained stores it once (two clones would double the embeddings on disk: +113 MB on SmolLM2-135M).
    copies: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
    for key, value in base.state_dict().items():
        # A saved module is its active adapter's trained copy; its original is the base the copy replaces.
        if ".original_module." in key or (is_adapter_key(key) and not is_saved_copy_key(key, adapter)):
            continue
        key = unwrapped_name(key)
        delta = deltas.get(key)
        if delta is not None:
            merged[key] = value + delta.to(value.dtype)
            continue
        identity = (value.data_ptr(), tuple(value.shape))
        if identity not in copies:
            copies[identity] = value.detach().clone()
        merged[key] = copies[identity]
    return merged


def copy_by_canonical_name(module: nn.Module, state: dict[str, torch.Tensor], skip_value_head: bool = True) -> int:
    """Copy ``state`` (any naming: wrapper, peft or plain HF) into ``module``'s parameters matched by canonical
    name; adapter weights must match exactly. Returns how many tensors were copied; raises ValueError when a
    weight matches nothing, a target is quantised or a shape differs."""
    params, saved_copies = {}, {}
    for name, param in module.named_parameters():
        params[name if is_adapter_key(name) else canonical_name(name)] = param
        if is_saved_copy_key(name):  # a plain weight loads into the saved module's copy too: training starts there
            saved_copies.setdefault(canonical_name(name), []).append(param)
    copied, unmatched = 0, []
    with torch.no_grad():
        for key, value in state.items():
            if skip_value_head and key.startswith(VALUE_HEAD_PREFIX):
                continue
            key = key if is_adapter_key(key) else canonical_name(key)
            target = params.get(key)
            if target is None:
                unmatched.append(key)  # silently dropping e.g. LoRA weights would train from the wrong start
                continue
            if target.shape != value.shape or not target.dtype.is_floating_point:
                raise ValueError(
                    f"cannot load {key!r}: shape {tuple(value.shape)} into {tuple(target.shape)} {target.dtype} "
                    "(a quantised or different architecture?)"
                )
            target.copy_(value)
            for saved_copy in [] if is_adapter_key(key) else saved_copies.get(key, []):
                saved_copy.copy_(value)
            copied += 1
    if unmatched or copied == 0:
        raise ValueError(
            f"{len(unmatched)} weights match no parameter of this model (e.g. {unmatched[:3]}): a different "
            "architecture or LoRA configuration?"
        )
    return copied


def merge_lora_state(
    state: dict[str, torch.Tensor], alpha: float, r: int, module: nn.Module
) -> dict[str, torch.Tensor]:
    """``state`` of a LoRA run (adapter weights under peft names) turned into full weights for ``module`` (a full
    fine-tuning backbone loaded from the same base): each adapted layer becomes its weight in ``module`` plus
    ``B @ A * alpha / r`` (peft's merge, without rsLoRA); a saved module's trained copy becomes that module's weight.
    Other entries pass through unchanged."""
    params = {canonical_name(name): param for name, param in module.named_parameters()}
    merged, pairs = {}, {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            layer, kind = key.split(".lora_")[0], key.split(".lora_")[1][0]
            pairs.setdefault(canonical_name(layer), {})[kind] = value
        elif is_saved_copy_key(key):
            merged[f"model.{canonical_name(key)}"] = value
        else:
            merged[key] = value
    for layer, pair in pairs.items():
        weight = params.get(f"{layer}.weight")
        if weight is None or set(pair) != {"A", "B"}:
            raise ValueError(f"the LoRA layer {layer!r} has no weight to merge into in this model")
        delta = (pair["B"].float() @ pair["A"].float()) * (alpha / r)
        if delta.shape != weight.shape:
            raise ValueError(
                f"the LoRA layer {layer!r} gives {tuple(delta.shape)}, its weight is {tuple(weight.shape)}"
            )
        merged[f"model.{layer}.weight"] = (weight.detach().float() + delta).to(weight.dtype)
    return merged


def load_trainable(
    module: nn.Module, state: dict[str, torch.Tensor], strict: bool = True, value_head: bool = True
) -> None:
    """Copy ``state`` (trainable weights by parameter name) into ``module``; ``strict`` refuses missing or unknown
    names, naming a few; ``value_head=False`` leaves the value head as it is."""
    if not value_head:
        state = {k: v for k, v in state.items() if not k.startswith(VALUE_HEAD_PREFIX)}
    params = dict(module.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if not value_head:
        expected = {n for n in expected if not n.startswith(VALUE_HEAD_PREFIX)}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - params.keys())
    if strict and (missing or unexpected):
        raise ValueError(
            f"state does not match this backbone: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); a different LoRA/value-head configuration?"
        )
    with torch.no_grad():
        for name, value in state.items():
            if name in params:
                params[name].copy_(value)


def add_frozen_adapter_copy(peft_model: nn.Module, name: str = REFERENCE_ADAPTER) -> None:
    """A second adapter ``name`` holding a frozen copy of the active adapter's weights, without dropout (a
    reference scores deterministically, in training mode too). It shares the base weights (plain or
    quantised), so it costs the adapter's memory, not the model's."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    active = peft_model.active_adapter
    if name in peft_model.peft_config:
        peft_model.delete_adapter(name)
    config = copy.deepcopy(peft_model.peft_config[active])
    config.lora_dropout = 0.0
    with adapters_kept_trainable(peft_model):  # add_adapter may change which adapter trains
        peft_model.add_adapter(name, config)
        weights = get_peft_model_state_dict(peft_model, adapter_name=active)
        set_peft_model_state_dict(peft_model, weights, adapter_name=name)


def lora_reference(peft_model: nn.Module) -> contextlib.AbstractContextManager:
    """The reference policy of a LoRA run: the adapter :func:`add_frozen_adapter_copy` anchored, else the base
    weights (the adapter disabled)."""
    if REFERENCE_ADAPTER in peft_model.peft_config:
        return adapter_active(peft_model, REFERENCE_ADAPTER)
    return peft_model.disable_adapter()


@contextlib.contextmanager
def adapter_active(peft_model: nn.Module, name: str) -> Iterator[nn.Module]:
    """Run the model with adapter ``name`` in place of the active one, then switch back."""
    active = peft_model.active_adapter
    with adapters_kept_trainable(peft_model):
        peft_model.set_adapter(name, inference_mode=True)
        try:
            yield peft_model
        finally:
            peft_model.set_adapter(active, inference_mode=True)


@contextlib.contextmanager
def adapters_kept_trainable(model: nn.Module) -> Iterator[None]:
    """Exactly the parameters that trained before train after (peft's adapter switches set ``requires_grad``
    themselves); parameters added inside are frozen."""
    trainable = {id(param) for param in model.parameters() if param.requires_grad}
    try:
        yield
    finally:
        for param in model.parameters():
            param.requires_grad_(id(param) in trainable)
