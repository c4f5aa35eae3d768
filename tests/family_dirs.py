"""Tiny random Qwen2-VL / Qwen2.5-VL directories laid out as users hold them, built without torchvision.

Two layouts (both fail in plain ``AutoProcessor`` without torchvision, for different reasons):
* ``hub``: what the Hub's Qwen checkpoints ship: ``preprocessor_config.json`` (image processor, naming
  ``Qwen2VLProcessor``), ``chat_template.json``, tokenizer files; no processor or video config.
* ``v5``: what transformers 5's ``processor.save_pretrained`` writes: one ``processor_config.json`` nesting the
  image and video processor configs, ``chat_template.jinja``.
"""

from __future__ import annotations

import json
from pathlib import Path

QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")
LAYOUTS = ("hub", "v5")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Images become at most 112 x 112 px: 8 x 8 patches of 14 px, merged 2 x 2 into 16 tokens.
IMAGE_PROCESSOR = dict(
    do_resize=True, do_rescale=True, do_normalize=True, do_convert_rgb=True, rescale_factor=1 / 255,
    image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, temporal_patch_size=2, merge_size=2,
)


def tokenizer(corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([*corpus, "user", "assistant"], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left",
        extra_special_tokens=SPECIALS[1:], chat_template=CHAT_TEMPLATE, model_max_length=4096,
    )


def _config(family: str, tok):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    ids = {name: tok.convert_tokens_to_ids(token) for name, token in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    text = dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=len(tok), max_position_embeddings=4096, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, bos_token_id=None, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )
    vision = dict(depth=2, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    if family == "qwen2_vl":
        vision.update(embed_dim=32, hidden_size=64, mlp_ratio=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    vision.update(hidden_size=32, out_hidden_size=64, intermediate_size=64, fullatt_block_indexes=[1], window_size=56)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)


def make_qwen_dir(out: Path, family: str, layout: str, corpus: list[str], seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    tok = tokenizer(corpus)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(_config(family, tok), dtype=torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    image = dict(IMAGE_PROCESSOR, image_processor_type="Qwen2VLImageProcessor")
    processor_class = "Qwen2VLProcessor" if family == "qwen2_vl" else "Qwen2_5_VLProcessor"
    if layout == "hub":
        (out / "preprocessor_config.json").write_text(json.dumps({**image, "processor_class": processor_class}))
        (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
        (out / "chat_template.jinja").unlink(missing_ok=True)
    else:
        video = dict(IMAGE_PROCESSOR, video_processor_type="Qwen2VLVideoProcessor", fps=2.0)
        config = {"processor_class": processor_class, "image_processor": image, "video_processor": video}
        (out / "processor_config.json").write_text(json.dumps(config))
        (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return out
