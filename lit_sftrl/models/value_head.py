"""The PPO state-value head (docs/spec.md §5): an MLP on the final hidden state of the last prompt token, sharing the
backbone. Kept in fp32 whatever the backbone dtype, so small value targets are not rounded away."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

VALUE_HEAD_FILE = "value_head.safetensors"


class ValueHead(nn.Module):
    """``hidden_size -> hidden -> 1``; the output layer starts at zero so V(s) = 0 before any training."""

    def __init__(self, hidden_size: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, hidden), nn.GELU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[..., hidden_size] (any dtype) -> [...] fp32."""
        return self.net(hidden_states.float()).squeeze(-1)

    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        out = Path(directory) / VALUE_HEAD_FILE
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(out))
        return out

    def load(self, directory: str | Path) -> None:
        from safetensors.torch import load_file

        self.load_state_dict(load_file(str(Path(directory) / VALUE_HEAD_FILE)))
