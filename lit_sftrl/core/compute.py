"""Compute accounting, the paper's x-axis (docs/spec.md §7).

Training costs 6·N·D FLOPs and inference 2·N·D, with N the model's parameters and D the tokens processed
(text and image tokens, prompt and answer). A run started from another run's weights inherits that run's
total as its starting point (the paper's D_init), so SFT and RL curves share one axis.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from lit_sftrl.core.validation import validate

TRAIN_FLOPS_PER_PARAM_TOKEN = 6
INFERENCE_FLOPS_PER_PARAM_TOKEN = 2
PAPER_IMAGE_TOKENS = 1600  # what the original counted per image


@dataclass
class ComputeConfig:
    """How FLOPs are counted.

    Args:
        mode: ``tokens`` (default) counts every token the model really processed: prompt, image and answer tokens
            of training passes at 6N, of rollout generation (and reference scoring) at 2N. ``paper`` follows the
            paper's approximation: each image counts ``image_tokens`` tokens, and RL's rollout tokens are taken
            as ``buffer_ratio`` x the tokens PPO trained on (D_buffer = lambda x D_RL).
        buffer_ratio: lambda in ``paper`` mode; ``None`` = the paper's (6 for GeneralPoints, 5.1 for V-IRL).
        image_tokens: tokens per image in ``paper`` mode (the original counted 1,600).
    """

    mode: Literal["tokens", "paper"] = "tokens"
    buffer_ratio: float | None = None
    image_tokens: int = PAPER_IMAGE_TOKENS

    def __post_init__(self) -> None:
        if self.mode not in ("tokens", "paper"):
            raise ValueError(f"compute.mode: must be 'tokens' or 'paper', got {self.mode!r}")
        validate(self, "compute")

    @property
    def tokens_per_image(self) -> int | None:
        """What the backbone counts per image: the paper's constant, or None (the images' real token count)."""
        return self.image_tokens if self.mode == "paper" else None


@dataclass
class FlopsCounter:
    """Cumulative FLOPs of one run: ``initial`` (inherited) + 6·N·train_tokens + 2·N·inference_tokens."""

    num_parameters: int
    initial: float = 0.0
    train_tokens: int = 0
    inference_tokens: int = 0

    def add_training(self, tokens: int) -> None:
        """Tokens that went through a forward and backward pass (SFT steps, PPO mini-batches)."""
        self.train_tokens += int(tokens)

    def add_inference(self, tokens: int) -> None:
        """Tokens that went through a forward pass only (rollout generation, value and reference scoring)."""
        self.inference_tokens += int(tokens)

    @property
    def total(self) -> float:
        n = self.num_parameters
        return (
            self.initial
            + TRAIN_FLOPS_PER_PARAM_TOKEN * n * self.train_tokens
            + INFERENCE_FLOPS_PER_PARAM_TOKEN * n * self.inference_tokens
        )

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def token_counts(batch: dict, tile_tokens: int | None = None, tokens_per_image: int | None = None):
    """Per row of a model-input batch, the tokens the model processes: text tokens without padding (LLaVA-like
    families' image placeholder tokens included) plus, for cross-attention families (Mllama), ``tile_tokens`` per
    image tile, which never enter the text. ``tokens_per_image`` (the paper's accounting) replaces the image's
    real tokens by a constant per row that has an image."""
    counts = batch["attention_mask"].sum(dim=1).cpu()
    if tokens_per_image is not None:
        has_image = any(key in batch for key in ("pixel_values", "cross_attention_mask"))
        return counts + tokens_per_image * int(has_image)
    if tile_tokens and "cross_attention_mask" in batch and "aspect_ratio_mask" in batch:
        counts = counts + batch["aspect_ratio_mask"].flatten(1).sum(dim=1).cpu() * tile_tokens
    return counts
