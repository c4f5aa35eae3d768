"""Processors of families whose video side needs torchvision (Qwen2-VL, Qwen2.5-VL and any processor that takes a
``video_processor``), loaded and exported image-only.

Why: lit-sftrl never installs torchvision (its PyPI build breaks torch 2.13's CPU wheel), and transformers 5
builds every video processor on torchvision, so ``AutoProcessor`` cannot load such a directory at all, whichever
layout it has (the Hub's ``preprocessor_config.json`` or transformers 5's nested ``processor_config.json``). The
image path never touches the video processor, so a subclass without that argument loads and works.

Exports must reload in plain transformers, with no class of ours registered. transformers ships a processor with
exactly the Qwen2-VL image path and no video argument (``PaddleOCRVLProcessor``: image processor + tokenizer,
``image_grid_thw / merge_size**2`` placeholders per image, ``mm_token_type_ids``). Exports name it, and are checked
at export time to encode a probe prompt exactly as the training processor did; where that ever fails (another
family, another transformers release) the export keeps the original class and says so.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
PLAIN_IMAGE_ONLY_PROCESSOR = "PaddleOCRVLProcessor"
_IMAGE_ONLY_SUFFIX = "ImageOnly"


def takes_video(processor_class) -> bool:
    return processor_class is not None and "video_processor" in processor_class.get_attributes()


def image_only_class(processor_class):
    """``processor_class`` without its video processor (cached: one subclass per class)."""
    cached = _SUBCLASSES.get(processor_class)
    if cached is not None:
        return cached

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # transformers 5's processor_config.json nests a video_processor config: nothing to build it with here.
        kwargs.pop("video_processor", None)
        processor_class.__init__(self, image_processor, tokenizer, None, chat_template=chat_template)

    subclass = type(processor_class.__name__ + _IMAGE_ONLY_SUFFIX, (processor_class,), {"__init__": __init__})
    _SUBCLASSES[processor_class] = subclass
    return subclass


_SUBCLASSES: dict = {}


def _declared_processor_class(path: Path):
    """The processor class a directory names (processor, preprocessor or tokenizer config), else its model type's."""
    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING, processor_class_from_name

    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        try:
            declared = json.loads((path / name).read_text(encoding="utf-8")).get("processor_class")
        except (OSError, ValueError, AttributeError):
            continue
        if declared:
            return processor_class_from_name(declared)
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    return PROCESSOR_MAPPING.get(type(config), None)


def load_vlm_processor(path: str | Path):
    """``AutoProcessor`` for the directory, image-only when its class takes a video processor and torchvision is
    absent (then AutoProcessor cannot build it)."""
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    path = Path(path)
    processor_class = _declared_processor_class(path)
    if takes_video(processor_class) and not is_torchvision_available():
        return image_only_class(processor_class).from_pretrained(path, trust_remote_code=False)
    return AutoProcessor.from_pretrained(path, trust_remote_code=False)


def save_processor(processor, out: str | Path) -> None:
    """``processor.save_pretrained(out)``; an image-only processor is saved under a class plain transformers has
    (see the module docstring), after checking that this class encodes like ``processor``."""
    out = Path(out)
    processor.save_pretrained(out)
    if not type(processor).__name__.endswith(_IMAGE_ONLY_SUFFIX):
        return
    original = type(processor).__mro__[1].__name__
    config_file, tokenizer_file = out / "processor_config.json", out / "tokenizer_config.json"
    config, tokenizer_config = json.loads(config_file.read_text()), json.loads(tokenizer_file.read_text())
    config["processor_class"] = PLAIN_IMAGE_ONLY_PROCESSOR
    # That class reads the placeholder from the tokenizer's named special tokens ("image_token").
    tokenizer_config.setdefault("image_token", processor.image_token)
    tokenizer_config.pop("processor_class", None)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer_file.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    problem = _plain_reload_problem(processor, out)
    if problem is not None:
        config["processor_class"] = original
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        log.warning(
            "%s: saved as %s, which plain transformers loads only with torchvision installed (%s)",
            out, original, problem,
        )


def _plain_reload_problem(processor, out: Path) -> str | None:
    """None when plain ``AutoProcessor`` loads ``out`` and encodes a probe image prompt exactly as ``processor``."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor

    try:
        plain = AutoProcessor.from_pretrained(out, trust_remote_code=False)
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8))
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
        encoded = []
        for candidate in (processor, plain):
            text = candidate.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            encoded.append(candidate(text=[text], images=[[image]], return_tensors="pt"))
    except Exception as error:  # noqa: BLE001 - any failure means: not loadable as written
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    ours, theirs = encoded
    if ours.keys() != theirs.keys() or not all(torch.equal(ours[k], theirs[k]) for k in ours):
        return f"{PLAIN_IMAGE_ONLY_PROCESSOR} encodes differently"
    return None
