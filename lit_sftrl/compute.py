"""Compute accounting, the paper's x-axis (SPEC §7).

Training costs 6·N·D FLOPs and inference 2·N·D, with N the model's parameters and D the tokens processed
(text and image tokens, prompt and answer). A run started from another run's weights inherits that run's
total as its starting point (the paper's D_init), so SFT and RL curves share one axis.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

TRAIN_FLOPS_PER_PARAM_TOKEN = 6
INFERENCE_FLOPS_PER_PARAM_TOKEN = 2


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
