"""Models: the backbone wrapper (any local Hugging Face VLM or LM; LoRA, 4/8-bit, value head, batched generation
and scoring), the tiny offline model builder, and export of Lightning checkpoints.

Names are imported lazily, so ``import lit_sftrl.models`` stays cheap (no torch/transformers until used).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Backbone": "backbone",
    "BackboneConfig": "config",
    "Generation": "config",
    "LoraSettings": "config",
    "Message": "config",
    "Prompt": "config",
    "SamplingConfig": "config",
    "Scores": "config",
    "ValueHead": "value_head",
    "make_tiny": "tiny",
    "resolve_model_path": "tiny",
    "export_checkpoint": "export",
    "load_backbone_from_lightning_checkpoint": "export",
    "load_weights_for_init": "export",
    "read_lightning_checkpoint": "export",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
