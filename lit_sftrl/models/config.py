"""Typed settings and results of the backbone wrapper (plain dataclasses: jsonargparse/LightningCLI reads them
from YAML). Re-exported by ``lit_sftrl.models.backbone``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from lit_sftrl.core.validation import validate
from lit_sftrl.models.chat import Message, Prompt

if TYPE_CHECKING:
    import torch

    from lit_sftrl.models.kv_cache import ConversationCache

__all__ = [
    "BackboneConfig", "Generation", "LoraSettings", "Message", "Prompt", "SamplingConfig", "Scores",
    "as_backbone_config",
]


@dataclass
class LoraSettings:
    """LoRA adapter (peft).

    Args:
        r: rank of the adapter's matrices.
        alpha: scaling numerator (the update is scaled by ``alpha / r``).
        dropout: dropout on the adapter's input.
        target_modules: ``None`` targets the language model's attention and MLP linear layers only (never the
            vision tower); a string is a regex over full module names, a list names module suffixes.
        modules_to_save: module-name suffixes (``embed_tokens``, ``lm_head``) trained in full beside the adapter
            (peft's ``modules_to_save``): each costs a trainable copy of its weights, with their gradients and
            AdamW states; the original stays as the KL reference. A name no module has, a module LoRA adapts or
            a quantised one is refused before training. Tied input and output embeddings stay tied: naming
            either trains one shared copy.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | list[str] | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        validate(self, "lora")


@dataclass
class BackboneConfig:
    """How to load and adapt the model.

    Args:
        path: a local Hugging Face directory (or a ``.gguf`` file of a text LM). A missing directory named
            ``tiny-<family>[-small]`` (family ``mllama`` or ``llava``) is built on first use; any other missing
            path is a FileNotFoundError.
        dtype: the weights' dtype (paper: ``bfloat16``).
        lora: a LoRA adapter to train instead of the full weights; ``None`` = full fine-tuning.
        quantization: bitsandbytes ``nf4`` or ``int8`` base weights; needs ``lora`` (QLoRA): quantised weights
            are frozen.
        gradient_checkpointing: recompute activations in the backward pass (less memory, more time).
        freeze_vision: keep the vision tower's weights fixed.
        value_head: add PPO's value head (switched on by the PPO module itself).
        value_head_hidden: width of the value head's hidden layer.
        reference: how reference log-probs (for a KL term) are obtained: ``auto`` = under LoRA the
            adapter-disabled model (free), under full fine-tuning a frozen copy of the weights at ``path`` loaded
            on the first request; ``eager`` = the same but the copy is loaded at construction; ``none`` =
            requests raise. The reference is always the model at ``path`` (what was loaded before any adapter or
            training).
        cache_conversations: during multi-turn rollouts keep each conversation's keys and values between its
            turns and prefill only the new tokens (full-attention models; text prompts, and Mllama's image prompts
            while the image is unchanged). Memory per environment: 2 x layers x kv_heads x head_dim x
            conversation tokens x bytes per value (Llama-3.2-11B in bf16: ~160 kB per token).
        max_tokens: the most tokens one training sample (prompt + answer) may have; a longer one stops the run
            with a message before the forward pass that would exhaust the memory.
    """

    path: str = "checkpoints/tiny-mllama"
    dtype: Literal["float32", "bfloat16"] = "float32"
    lora: LoraSettings | None = None
    quantization: Literal["none", "nf4", "int8"] = "none"
    gradient_checkpointing: bool = False
    freeze_vision: bool = False
    value_head: bool = False
    value_head_hidden: int = 256
    reference: Literal["auto", "eager", "none"] = "auto"
    cache_conversations: bool = True
    max_tokens: int = 8192

    def __post_init__(self) -> None:
        validate(self, "backbone")


@dataclass
class SamplingConfig:
    """Sampling settings.

    Args:
        temperature: softmax temperature; 0 is greedy.
        top_p: nucleus sampling; truncates the sampling distribution only (the returned log-probs are under the
            untruncated temperature-scaled distribution).
        max_new_tokens: the most tokens of one answer (paper: 512).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128

    def __post_init__(self) -> None:
        validate(self, "sampling")


@dataclass
class Generation:
    """One generated answer.

    ``logprobs``: fp32 log-prob of each answer token under softmax(logits / T) with the suppressed tokens
    (image and other special tokens) removed; T = the sampling temperature, 1 for greedy. ``value``: the value
    head on the prompt's last token (None without a value head). ``num_tokens``: tokens processed (prompt text
    + image + answer) for FLOPs accounting, counting the whole prompt even where a cached prefix saved its
    encoding (the paper's accounting). ``cache``: the conversation's keys and values, to continue it next
    turn (see :mod:`lit_sftrl.models.kv_cache`); None unless asked for. Tensors are on the CPU, except ``cache``.
    """

    prompt_ids: torch.Tensor
    answer_ids: torch.Tensor
    text: str
    logprobs: torch.Tensor
    value: float | None
    num_tokens: int = 0
    cache: ConversationCache | None = None


@dataclass
class Scores:
    """A scoring forward over (prompt, answer) pairs, in the order given.

    ``token_logprobs``: one 1-D fp32 tensor per sequence (its answer length), same distribution as
    ``Generation.logprobs``. ``logprob_sum`` and ``entropy`` (mean over the answer tokens; 0 for an empty
    answer) are [B] fp32. All carry gradients unless scored as reference. ``values``: [B] fp32, None without a
    value head or for the reference. ``num_tokens``: tokens processed (text + image, no padding) for FLOPs
    accounting.
    """

    logprob_sum: torch.Tensor
    token_logprobs: list[torch.Tensor]
    entropy: torch.Tensor
    values: torch.Tensor | None
    num_tokens: int


def as_backbone_config(config: BackboneConfig | dict[str, Any] | None) -> BackboneConfig:
    """Accept the dataclass or its dict form (as stored in checkpoint hyper-parameters)."""
    if config is None:
        return BackboneConfig()
    if isinstance(config, BackboneConfig):
        return config
    fields = dict(config)
    if isinstance(fields.get("lora"), dict):
        fields["lora"] = LoraSettings(**fields["lora"])
    return BackboneConfig(**fields)
