"""Tiny random-init vision-language models, built offline and deterministically from a seed.

``make_tiny`` writes a standard Hugging Face directory (config, safetensors weights, generation config,
tokenizer, image processor, processor, chat template) that ``AutoModelForImageTextToText`` and
``AutoProcessor`` load without lit-sftrl. The tokenizer is a byte-level BPE trained on the given corpus (the
environments' own text plus a sample of the skills corpus: ``corpus.tokenizer_corpus``), so every string is
encodable and the vocabulary stays small (a few thousand tokens): CPU training speed is dominated by sequence
length and vocabulary size.

Families: ``mllama`` (the paper's Llama-3.2-Vision architecture; the image enters through cross-attention,
so it costs no text positions) and ``llava`` (CLIP tower + projector; the image becomes 49 placeholder
tokens in the text at the default 224 px / 32 px patches).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

FAMILIES = ("mllama", "llava")
SIZES = ("tiny", "small")
TINY_NAME = re.compile(r"^tiny-(?P<family>[a-z0-9_]+?)(?P<small>-small)?$")

BOS, EOS, PAD = "<|begin_of_text|>", "<|eot_id|>", "<|pad|>"
HEADER_START, HEADER_END = "<|start_header_id|>", "<|end_header_id|>"
IMAGE_TOKEN = {"mllama": "<|image|>", "llava": "<image>"}
PATCH = 32  # 224 px / 32 = 7x7 patches: short vision sequences keep CPU runs fast

# Architecture per size (text side shared by both families; vision side per family below).
_TEXT = {
    "tiny": dict(
        hidden_size=192, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=768
    ),
    "small": dict(
        hidden_size=320, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, intermediate_size=1280
    ),
}
_VISION = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, intermediate_size=1024),
}
_VOCAB = {"tiny": 2048, "small": 4096}

# Jinja chat template; the image placeholder is substituted per family. Content may be a string or a list of
# {"type": "image"} / {"type": "text", "text": ...} parts (what processors' apply_chat_template passes).
_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    + HEADER_START
    + "{{ message['role'] }}"
    + HEADER_END
    + "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}@IMAGE@"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    + EOS
    + "{% endfor %}{% if add_generation_prompt %}"
    + HEADER_START
    + "assistant"
    + HEADER_END
    + "{% endif %}"
)

# Built-in corpus when the caller passes none: a little plain English, the chat roles, numbers and the JSON
# punctuation answers use. It only shapes which merges exist; every byte stays encodable regardless.
_FALLBACK_CORPUS = (
    "user",
    "assistant",
    "You are a helpful assistant. Answer with a JSON object and nothing else.",
    "The quick brown fox jumps over the lazy dog. A small model learns fast on a small vocabulary.",
    "Read the task, think about the numbers, then give the answer in the requested format.",
    "You failed this trial because the answer was not correct. Please try again.",
    '{"cards": ["A", "2", "10", "K"], "number": [1, 2, 10, 10], "formula": "(10 + 2) * (1 + 1) = 24"}',
    '{"current observation": "You observe an intersection", "current instruction": "Turn left", '
    '"action": "turn_direction(north)"}',
    "+ - * / ( ) = [ ] { } : , \" ' . ? !",
)


def _fallback_corpus() -> list[str]:
    numbers = " ".join(str(i) for i in range(200))
    return [*_FALLBACK_CORPUS, numbers]


def parse_tiny_name(name: str) -> tuple[str, str] | None:
    """``"tiny-mllama-small"`` -> ``("mllama", "small")``; None when the name is not a tiny-model name."""
    match = TINY_NAME.match(name)
    if match is None or match["family"] not in FAMILIES:
        return None
    return match["family"], "small" if match["small"] else "tiny"


def resolve_model_path(path: str | os.PathLike, corpus: Iterable[str] | None = None) -> Path:
    """Return ``path`` if it is a model directory; build it when it is missing and named ``tiny-<family>[-small]``;
    else FileNotFoundError naming it."""
    path = Path(path)
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{str(path)!r} is not a Hugging Face model directory (no config.json)")
        return path
    parsed = parse_tiny_name(path.name)
    base = parse_tiny_name(path.name.removesuffix("-base")) if path.name.endswith("-base") else None
    if base is not None:  # the pretrained base takes ~30 CPU minutes: built on request, never on first use
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist: build the pretrained base with "
                                f"`lit-sftrl pretrain --base.family {base[0]} --base.size {base[1]} --base.out {path}`")
    if parsed is None:
        raise FileNotFoundError(
            f"model directory {str(path)!r} does not exist (nothing is downloaded: point `path` at a local Hugging "
            f"Face directory, or name it tiny-<family>[-small] with family in {FAMILIES} to build a tiny model)"
        )
    return make_tiny(path, family=parsed[0], size=parsed[1], corpus=corpus)


def train_tokenizer(corpus: Iterable[str], vocab_size: int, image_token: str):
    """Byte-level BPE trained on ``corpus``, wrapped for transformers with bos/eos/pad and left padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [BOS, EOS, PAD, HEADER_START, HEADER_END, image_token]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, whatever the corpus
        show_progress=False,
    )
    backend.train_from_iterator(list(corpus), trainer=trainer)
    # The header and image tokens exist only in this vocabulary: declare them special too, otherwise
    # skip_special_tokens does not strip them and they cannot be suppressed at sampling time (docs/stack.md).
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=[HEADER_START, HEADER_END, image_token],
        padding_side="left",
        chat_template=_CHAT_TEMPLATE.replace("@IMAGE@", image_token),
        model_max_length=4096,
    )


def _text_kwargs(size: str, tokenizer) -> dict[str, Any]:
    return dict(
        _TEXT[size],
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def _mllama(size: str, tokenizer, image_size: int):
    from transformers import MllamaConfig, MllamaImageProcessorPil, MllamaProcessor

    text = _text_kwargs(size, tokenizer)
    layers = text["num_hidden_layers"]
    text["cross_attention_layers"] = list(range(1, layers, 2))  # every other layer sees the image
    vision = dict(_VISION[size])
    depth = vision["num_hidden_layers"]
    indices = list(range(depth))  # Mllama concatenates these intermediate layers' outputs
    vision.update(
        num_global_layers=1,
        image_size=image_size,
        patch_size=PATCH,
        max_num_tiles=1,  # one 224 px tile: the paper's tiling is not needed at this resolution
        supported_aspect_ratios=[[1, 1]],
        intermediate_layers_indices=indices,
        vision_output_dim=vision["hidden_size"] * (len(indices) + 1),
    )
    config = MllamaConfig(
        text_config=text, vision_config=vision, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN["mllama"])
    )
    image_processor = MllamaImageProcessorPil(size={"height": image_size, "width": image_size}, max_image_tiles=1)
    return config, MllamaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )


def _llava(size: str, tokenizer, image_size: int):
    from transformers import LlavaConfig, LlavaImageProcessorPil, LlavaProcessor

    num_image_tokens = (image_size // PATCH) ** 2
    config = LlavaConfig(
        text_config=dict(_text_kwargs(size, tokenizer), model_type="llama"),
        vision_config=dict(_VISION[size], model_type="clip_vision_model", image_size=image_size, patch_size=PATCH),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN["llava"]),
        image_seq_length=num_image_tokens,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",  # drops CLS: exactly (image_size / patch)^2 tokens
    )
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        chat_template=tokenizer.chat_template,
        image_token=IMAGE_TOKEN["llava"],
        num_additional_image_tokens=1,
    )
    return config, processor


def _reinit_zero_gates(model, generator) -> None:
    """Mllama's tanh cross-attention gates start at 0, which silences the image entirely; open them."""
    import torch

    for name, param in model.named_parameters():
        if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
            with torch.no_grad():
                param.copy_(0.5 + 0.5 * torch.rand(param.shape, generator=generator))


def make_tiny(
    out: str | os.PathLike,
    family: str = "mllama",
    size: str = "tiny",
    seed: int = 0,
    corpus: Iterable[str] | None = None,
    image_size: int = 224,
) -> Path:
    """Build a random-init ``family`` model of ``size`` (tiny ≈ 4 M, small ≈ 20 M parameters) into ``out``.

    Deterministic: the same arguments give byte-identical weights and tokenizer. Written to a temporary
    sibling directory and renamed into place, so a crash or a concurrent builder never leaves a half-written
    model; when ``out`` already exists it is returned untouched.
    """
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is not valid; allowed values: {', '.join(FAMILIES)}")
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not valid; allowed values: {', '.join(SIZES)}")
    if image_size % PATCH:
        raise ValueError(f"image_size={image_size} must be a multiple of the patch size {PATCH}")
    out = Path(out)
    if out.exists():
        return out
    texts = list(corpus) if corpus is not None else _fallback_corpus()
    tokenizer = train_tokenizer([*texts, "user", "assistant"], _VOCAB[size], IMAGE_TOKEN[family])
    config, processor = (_mllama if family == "mllama" else _llava)(size, tokenizer, image_size)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    _reinit_zero_gates(model, generator)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the model directory is meant to be shared
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "lit_sftrl_tiny.json").write_text(
            json.dumps({"family": family, "size": size, "seed": seed, "image_size": image_size}, indent=1) + "\n"
        )
        os.rename(tmp, out)
    except OSError:
        if not out.exists():  # a real failure, not a concurrent builder that won the rename
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
