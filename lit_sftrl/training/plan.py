"""A run's plan before the run: memory per device and the FLOPs of one update, from ``config.json`` alone.

The model is built on the meta device (no weights are read or allocated), so an 11B model is planned on a laptop.
Memory is counted per device for the strategy the trainer config names:

- **replicated** (DDP, ``auto``): every device holds the weights, gradients and optimizer state;
- **zero2** (DeepSpeed stage 2, what the paper ran): weights replicated, gradients and optimizer state sharded;
- **sharded** (FSDP2 through ``ModelParallelStrategy``, DeepSpeed stage 3): all three sharded, plus the layers
  all-gathered during a forward (this layer and the next one, prefetched); lit-sftrl's rollouts gather the whole
  model on every rank (:func:`lit_sftrl.training.sharding.whole_weights`), in the compute dtype.

The peak is the state held throughout plus the largest phase: the update (activations, gathered layers), the
rollout (KV cache, and under sharding the whole weights) or the reference scoring (under sharding the whole
frozen copy).

What each row assumes (an estimate, not a measurement; ``bench/plan_memory.py`` measures the tiny case):

- weights in ``backbone.dtype`` (nf4: 0.5 byte per weight plus one fp32 scale per 64; int8: 1 byte) on the
  quantisable linears (the vision tower and output layer stay float); LoRA adapters in fp32, the copies of
  ``lora.modules_to_save`` in ``backbone.dtype``;
- gradients of the trainable weights in their dtype; AdamW keeps two states per trainable weight in its dtype;
- activations kept for the backward of one micro-batch at the longest sequence: per decoder layer and token the
  saved inputs of every matmul and norm (``6 x hidden + 3 x kv width + 4 x intermediate`` values) plus, without a
  fused attention kernel, the attention probabilities (``heads x sequence``); with activation checkpointing one
  layer's worth plus each layer's input; the vision tower alike over its patch tokens when it trains; the output
  layer's logits over the scored positions in the compute dtype, plus their fp32 log-softmax and its gradient;
- the rollout's KV cache: every slot's conversation (prompt and answer) in the self-attention layers, and for
  Mllama the image's keys and values in the cross-attention layers;
- the KL reference: free under LoRA (the adapter disabled), a frozen copy of the weights under full fine-tuning,
  sharded like the model; under sharding its reference log-probs are computed on the whole copy, gathered once
  the rollout's whole weights are freed (a phase of its own).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lit_sftrl.core.compute import FlopsCounter
from lit_sftrl.core.validation import check_values, config_value
from lit_sftrl.models.config import BackboneConfig
from lit_sftrl.models.loading import (
    DEFAULT_LORA_TARGETS,
    auto_model_class,
    is_lora_target,
    is_vision_module,
    saved_module_names,
)

Sharding = Literal["replicated", "zero2", "sharded"]
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
NF4_BYTES = 0.5 + 4 / 64  # 4 bits per weight and one fp32 absmax per block of 64 (no double quantisation)
INT8_BYTES = 1.0
ADAMW_STATES = 2  # exp_avg and exp_avg_sq
GIB = 1024**3
# Values saved per token of a decoder layer for its backward (see the module docstring), in units of the widths.
SAVED_PER_TOKEN = {"hidden": 6, "kv": 3, "intermediate": 4}
# Rows that exist only during one phase of an update: the peak holds the largest phase, not all of them.
UPDATE_ROWS = ("layers all-gathered", "activations")
ROLLOUT_ROWS = ("rollout: whole weights", "rollout KV cache")
REFERENCE_ROWS = ("reference: whole weights",)
PHASES = (UPDATE_ROWS, ROLLOUT_ROWS, REFERENCE_ROWS)


@dataclass
class PlanSettings:
    """What the plan needs besides the model: the run's shape.

    Args:
        kind: ``sft`` or ``ppo``.
        devices: processes (GPUs) in the run.
        sharding: how weights, gradients and optimizer state are split over them (see the module docstring).
        compute_dtype: the dtype activations are computed in (``bfloat16`` under ``bf16-mixed``/``bf16-true``).
        micro_batch: sequences per forward/backward and device.
        prompt_tokens: text tokens of the longest prompt (revision turns carry the earlier attempts).
        answer_tokens: tokens of the longest answer (``max_new_tokens``).
        images: whether prompts carry an image (the -VL tasks).
        rollout_slots: conversations generating together per device (PPO's ``num_envs``); 0 for SFT.
        kl_reference: whether the KL term needs reference log-probs (PPO with ``kl_coef > 0``).
        fused_attention: attention without the probabilities materialised (flash / memory-efficient SDPA: GPUs).
        update_sequences: sequences trained on per update over all devices (PPO: attempts; SFT: one batch).
        update_epochs: passes over them (PPO's ``ppo_epochs``; 1 for SFT).
        rollout_sequences: sequences generated per update over all devices (0 for SFT).
    """

    kind: Literal["sft", "ppo"] = "ppo"
    devices: int = 1
    sharding: Sharding = "replicated"
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    micro_batch: int = 1
    prompt_tokens: int = 1024
    answer_tokens: int = 512
    images: bool = False
    rollout_slots: int = 0
    kl_reference: bool = False
    fused_attention: bool = False
    update_sequences: int = 1
    update_epochs: int = 1
    rollout_sequences: int = 0

    def __post_init__(self) -> None:
        check_values("plan.", devices=self.devices, micro_batch=self.micro_batch, prompt_tokens=self.prompt_tokens,
                     answer_tokens=self.answer_tokens, update_sequences=self.update_sequences,
                     update_epochs=self.update_epochs)
        if self.sharding not in ("replicated", "zero2", "sharded"):
            raise ValueError(f"plan.sharding: must be replicated, zero2 or sharded, got {self.sharding!r}")


@dataclass
class MemoryPlan:
    """Bytes per device by what holds them, and the FLOPs of one update (all devices)."""

    rows: dict[str, float]
    flops_per_update: float
    parameters: int
    trainable: int
    settings: PlanSettings
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        """The peak: the state held throughout, plus the largest phase's transient memory: the update's, the
        rollout's or the reference scoring's (each frees what it gathered before the next one starts)."""
        phases = [sum(self.rows.get(name, 0.0) for name in names) for names in PHASES]
        state = sum(value for name, value in self.rows.items() if not any(name in names for names in PHASES))
        return state + max(phases)

    def table(self) -> str:
        s = self.settings
        lines = [
            f"plan: {s.kind.upper()} on {s.devices} device(s), {s.sharding}, activations in {s.compute_dtype}, "
            f"micro-batch {s.micro_batch} x {s.prompt_tokens + s.answer_tokens} tokens"
            f"{' + an image' if s.images else ''}",
            f"  parameters {self.parameters / 1e9:.3f} B, trainable {self.trainable / 1e9:.3f} B",
            "  per device:",
        ]
        lines += [f"    {name:<26} {value / GIB:9.2f} GiB" for name, value in self.rows.items()]
        lines += [f"    {'peak':<26} {self.total / GIB:9.2f} GiB   (state + the largest phase's rows: update, "
                  "rollout, reference)",
                  f"  FLOPs of one update (all devices): {self.flops_per_update:.3e}"]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


@lru_cache(maxsize=4)
def meta_model(path: str) -> nn.Module:
    """The architecture at ``path`` (its config.json only) with every tensor on the meta device."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    with torch.device("meta"):
        return auto_model_class(path).from_config(config)


def lora_parameters(model: nn.Module, backbone: BackboneConfig) -> int:
    """Adapter weights peft would add: ``r x (in + out)`` per targeted linear layer (peft's matching rules)."""
    lora = backbone.lora
    targets = lora.target_modules if lora.target_modules is not None else DEFAULT_LORA_TARGETS
    return sum(
        lora.r * (module.in_features + module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and is_lora_target(name, targets)
    )


def saved_parameters(model: nn.Module, backbone: BackboneConfig) -> int:
    """Weights of the trainable copies ``lora.modules_to_save`` adds (tied embeddings share one copy)."""
    saved = backbone.lora.modules_to_save if backbone.lora is not None else None
    if not saved:
        return 0
    params = {id(p): p.numel() for name in saved_module_names(model, saved)
              for p in model.get_submodule(name).parameters()}
    return sum(params.values())


def weight_bytes(model: nn.Module, backbone: BackboneConfig) -> float:
    """The base model's weights in memory: float in ``backbone.dtype``, quantisable linears packed."""
    dtype_bytes = DTYPE_BYTES[backbone.dtype]
    quantised = {"nf4": NF4_BYTES, "int8": INT8_BYTES}.get(backbone.quantization)
    total = 0.0
    for name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            packable = (
                quantised is not None and isinstance(module, nn.Linear) and param_name == "weight"
                and not is_vision_module(name) and not name.endswith("lm_head")
            )
            total += param.numel() * (quantised if packable else dtype_bytes)
    return total


def trainable_parameters(model: nn.Module, backbone: BackboneConfig) -> int:
    """Weights the optimizer updates (the value head apart): LoRA's adapters and the copies of its
    ``modules_to_save``, or every weight but a frozen vision tower."""
    if backbone.lora is not None:
        return lora_parameters(model, backbone) + saved_parameters(model, backbone)
    return sum(p.numel() for name, p in model.named_parameters()
               if not (backbone.freeze_vision and is_vision_module(name)))


def plan_run(path: str | Path, backbone: BackboneConfig, settings: PlanSettings,
             value_head_hidden: int | None = None) -> MemoryPlan:
    """The memory per device and FLOPs of one update of ``settings`` on the model at ``path`` (config only)."""
    model = meta_model(str(path))
    text = model.config.get_text_config(decoder=True)
    vision = getattr(model.config, "vision_config", None)
    s = settings
    shards = s.devices if s.sharding == "sharded" else 1
    state_shards = s.devices if s.sharding in ("zero2", "sharded") else 1
    parameters = sum(p.numel() for p in model.parameters())
    trainable = trainable_parameters(model, backbone)
    # Bytes per trainable weight: peft keeps adapters in fp32; the copies of modules_to_save keep the model's dtype.
    saved = saved_parameters(model, backbone)
    trainable_bytes = (4 * (trainable - saved) + DTYPE_BYTES[backbone.dtype] * saved if backbone.lora is not None
                       else DTYPE_BYTES[backbone.dtype] * trainable)
    weights = weight_bytes(model, backbone)
    added_bytes = trainable_bytes if backbone.lora is not None else 0  # adapters and copies beside the base weights
    rows: dict[str, float] = {"weights": (weights + added_bytes) / shards}
    notes = []
    if s.sharding == "sharded":
        rows["layers all-gathered"] = 2 * _largest_layer_parameters(model) * DTYPE_BYTES[s.compute_dtype]
    rows["gradients"] = trainable_bytes / state_shards
    rows["optimizer (AdamW)"] = ADAMW_STATES * trainable_bytes / state_shards
    if s.kind == "ppo":
        head = text.hidden_size * (value_head_hidden or 256) + 2 * (value_head_hidden or 256) + 1
        rows["value head"] = head * 4 * (2 + ADAMW_STATES)  # fp32 weights, gradients, AdamW; small: counted whole
    if s.kl_reference:
        rows["KL reference"] = 0.0 if backbone.lora is not None else weights / shards  # a frozen copy
        if backbone.lora is not None:
            anchor = "a second adapter" + (" and copy of modules_to_save" if saved else "")
            notes.append(f"KL reference under LoRA: the adapter disabled ({anchor} when init_from)")
        elif s.sharding == "sharded":  # scored on the whole copy, like the rollout on the whole model
            rows["reference: whole weights"] = parameters * DTYPE_BYTES[s.compute_dtype]
    rows["activations"] = _activation_bytes(model, text, vision, backbone, s)
    if s.rollout_slots:
        if s.sharding == "sharded":  # lit_sftrl.training.sharding.whole_weights: every rank decodes at its own pace
            rows["rollout: whole weights"] = parameters * DTYPE_BYTES[s.compute_dtype]
        rows["rollout KV cache"] = _kv_cache_bytes(text, vision, backbone, s)
    flops = FlopsCounter(parameters)
    sequence = s.prompt_tokens + s.answer_tokens + (_image_tokens(vision) if s.images else 0)
    flops.add_training(s.update_sequences * s.update_epochs * sequence)
    flops.add_inference(s.rollout_sequences * sequence * (2 if s.kl_reference else 1))
    if s.images and vision is not None and model.config.model_type != "mllama":
        notes.append(f"image tokens ({_image_tokens(vision)}) counted in the text sequence")
    return MemoryPlan(rows, flops.total, parameters, trainable, s, notes)


def _largest_layer_parameters(model: nn.Module) -> int:
    """The biggest repeated block (a decoder or vision layer): FSDP all-gathers it, in the compute dtype, for its
    forward, and the next one ahead of it."""
    return max((sum(p.numel() for p in layer.parameters())
                for module in model.modules() if isinstance(module, nn.ModuleList) for layer in module), default=0)


def _image_tokens(vision: Any) -> int:
    if vision is None:
        return 0
    patches = (vision.image_size // vision.patch_size) ** 2 + 1  # + the class token
    return patches * getattr(vision, "max_num_tiles", 1)


def _layer_values(hidden: int, kv: int, intermediate: int, heads: int, sequence: int, fused: bool) -> int:
    """Values one layer saves per token for its backward."""
    attention = 0 if fused else heads * sequence
    return (SAVED_PER_TOKEN["hidden"] * hidden + SAVED_PER_TOKEN["kv"] * kv
            + SAVED_PER_TOKEN["intermediate"] * intermediate + attention)


def _stack_values(layers: int, per_layer: int, hidden: int, checkpointing: bool) -> int:
    """Values saved per token by a stack of layers: all of them, or (activation checkpointing) each layer's input
    plus one layer's worth, recomputed during the backward."""
    return per_layer + layers * hidden if checkpointing else layers * per_layer


def _activation_bytes(model: nn.Module, text: Any, vision: Any, backbone: BackboneConfig, s: PlanSettings) -> float:
    act = DTYPE_BYTES[s.compute_dtype]
    sequence = s.prompt_tokens + s.answer_tokens
    if s.images and vision is not None and model.config.model_type != "mllama":
        sequence += _image_tokens(vision)  # LLaVA-like families put the image's tokens in the text
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv = (getattr(text, "num_key_value_heads", None) or text.num_attention_heads) * head_dim
    per_layer = _layer_values(text.hidden_size, kv, text.intermediate_size, text.num_attention_heads, sequence,
                              s.fused_attention)
    checkpointing = backbone.gradient_checkpointing
    total = s.micro_batch * sequence * _stack_values(text.num_hidden_layers, per_layer, text.hidden_size,
                                                     checkpointing) * act
    if s.images and vision is not None and not backbone.freeze_vision and backbone.lora is None:
        patches = _image_tokens(vision)
        heads = getattr(vision, "attention_heads", None) or vision.num_attention_heads
        vision_layers = vision.num_hidden_layers + getattr(vision, "num_global_layers", 0)
        vision_per_layer = _layer_values(vision.hidden_size, vision.hidden_size, vision.intermediate_size, heads,
                                         patches, s.fused_attention)
        total += s.micro_batch * patches * _stack_values(vision_layers, vision_per_layer, vision.hidden_size,
                                                         checkpointing) * act
    scored = s.answer_tokens + 1 if s.kind == "ppo" else sequence  # PPO scores the answer only (logits_to_keep)
    vocab = text.vocab_size
    total += s.micro_batch * scored * vocab * (act + 4 + 4)  # logits, fp32 log-softmax, its gradient
    return total


def _kv_cache_bytes(text: Any, vision: Any, backbone: BackboneConfig, s: PlanSettings) -> float:
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    per_token_layer = 2 * kv_heads * head_dim * DTYPE_BYTES[s.compute_dtype]  # keys and values
    cross = len(getattr(text, "cross_attention_layers", None) or ())
    self_layers = text.num_hidden_layers - cross
    conversation = s.prompt_tokens + s.answer_tokens
    total = s.rollout_slots * conversation * self_layers * per_token_layer
    if s.images and cross:
        total += s.rollout_slots * _image_tokens(vision) * cross * per_token_layer
    return total


# ---------------------------------------------------------------------------------------- from a parsed config

def sharding_of(strategy: Any) -> tuple[Sharding, str]:
    """How a trainer's ``strategy`` (a name or a ``class_path`` namespace) splits the model state, and its name."""
    if strategy is None or isinstance(strategy, str):
        name = strategy or "auto"
        if name.startswith("deepspeed_stage_3") or name.startswith("fsdp"):
            return "sharded", name
        if name.startswith("deepspeed_stage_2"):
            return "zero2", name
        return "replicated", name
    class_path = str(config_value(strategy, "class_path") or "")
    name = class_path.rsplit(".", 1)[-1]
    if name in ("ModelParallelStrategy", "FSDPStrategy"):
        return "sharded", name
    if name == "DeepSpeedStrategy":
        stage = config_value(strategy, "init_args.stage") or 2
        return ("sharded" if stage >= 3 else "zero2"), f"{name} stage {stage}"
    return "replicated", name


def uses_deepspeed(strategy: Any) -> bool:
    name = strategy if isinstance(strategy, str) else str(config_value(strategy, "class_path") or "")
    return "deepspeed" in name.lower()


def device_count(trainer: Any) -> int:
    devices = config_value(trainer, "devices")
    nodes = int(config_value(trainer, "num_nodes") or 1)
    if isinstance(devices, (list, tuple)):
        return len(devices) * nodes
    if isinstance(devices, int) or (isinstance(devices, str) and devices.isdigit()):
        return max(1, int(devices)) * nodes
    return nodes  # "auto": one per node is what the plan can assume


def settings_from_config(config: Any, prompt_tokens: int = 1024) -> tuple[BackboneConfig, PlanSettings, str]:
    """The backbone and run shape a parsed ``fit`` config describes (LightningCLI's namespace), and the strategy's
    name."""
    model = config_value(config, "model.init_args") or config.model
    data = config_value(config, "data.init_args") or config.data
    trainer = config.trainer
    backbone = BackboneConfig(**{k: v for k, v in vars(config_value(model, "backbone")).items()})
    sharding, strategy = sharding_of(config_value(trainer, "strategy"))
    devices = device_count(trainer)
    precision = str(config_value(trainer, "precision") or "32-true")
    compute = "bfloat16" if "bf16" in precision or backbone.dtype == "bfloat16" else "float32"
    task = str(config_value(data, "task.name") or "")
    images = task.endswith("_vl") or bool(config_value(data, "llava_json"))
    fused = str(config_value(trainer, "accelerator")) in ("gpu", "cuda")
    common = {"devices": devices, "sharding": sharding, "compute_dtype": compute, "prompt_tokens": prompt_tokens,
              "images": images, "fused_attention": fused}
    if str(config_value(config, "model.class_path") or "").endswith("PPOModule"):
        rollout = int(config_value(data, "rollout_steps")) * devices
        settings = PlanSettings(
            kind="ppo", micro_batch=int(config_value(model, "ppo.micro_batch_size")),
            answer_tokens=int(config_value(model, "sampling.max_new_tokens")),
            rollout_slots=int(config_value(data, "num_envs")),
            kl_reference=bool(config_value(model, "ppo.kl_coef")), update_sequences=rollout,
            update_epochs=int(config_value(model, "ppo.ppo_epochs")), rollout_sequences=rollout, **common,
        )
    else:
        batch = int(config_value(data, "batch_size"))
        settings = PlanSettings(
            kind="sft", micro_batch=batch, answer_tokens=int(config_value(model, "eval_sampling.max_new_tokens")),
            update_sequences=batch * devices * int(config_value(trainer, "accumulate_grad_batches") or 1), **common,
        )
    return backbone, settings, strategy

