"""Turning chats (+ an optional image) into model inputs, with the processor of any family.

One layout serves scoring and SFT, packed: ``[left padding][prompt][continuation]``, every row ending in the
last column, so a batch is as wide as its longest prompt + continuation (not its longest prompt plus its longest
continuation: PPO batches mix short first-turn prompts with long revision turns, and short answers with ones
cut at the cap). Prompts go through the processor exactly as at generation time (left-padded); continuation
token ids (sampled answers, or the rest of an SFT conversation) are appended after each row's prompt. Positions
follow the attention mask (as ``generate`` derives them), so the padding in front does not shift them. Per-token
side inputs the processor made for the prompt are extended over the appended tokens as ``generate`` does:
Mllama's ``cross_attention_mask`` repeats its last row, token-type ids are padded with 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lit_sftrl.models.chat import Message, Prompt

IGNORE = -100
REPEAT_LAST_ROW = ("cross_attention_mask",)
PAD_WITH_ZERO = ("token_type_ids", "mm_token_type_ids", "moe_mm_token_type_ids")
_TEXT_KEYS = ("input_ids", "attention_mask")


def per_token_keys(inputs: dict[str, Any]) -> list[str]:
    """The model inputs with one column per token (``[B, T, ...]`` like ``input_ids``: the attention and cross-
    attention masks, position and token-type ids): what must move, grow or be cut together with the tokens."""
    batch, length = inputs["input_ids"].shape
    return [
        key for key, value in inputs.items()
        if torch.is_tensor(value) and value.dim() >= 2 and value.shape[:2] == (batch, length)
        and not key.startswith(("pixel_values", "image_"))
    ]


@dataclass
class SftRow:
    """One conversation split for SFT: the first prompt (through the processor) and the token ids after it, with
    a flag per token saying whether it is trained on."""

    prompt: Prompt
    ids: list[int]
    labelled: list[bool]


class ChatEncoder:
    """Chat template rendering and tokenisation around a processor (or a bare tokenizer for text-only LMs)."""

    def __init__(self, processor, eos_ids: Sequence[int]) -> None:
        self.processor = processor
        self.eos_ids = list(eos_ids)
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.multimodal = hasattr(processor, "image_processor")
        if self.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set one in the model directory")

    # -- rendering -----------------------------------------------------------------------------------------
    def _template_messages(self, messages: Sequence[Message], has_image: bool) -> list[dict]:
        if not self.multimodal:
            return [dict(m) for m in messages]
        users = [i for i, message in enumerate(messages) if message["role"] == "user"]
        if has_image and not users:
            raise ValueError("an image needs a user turn to belong to")
        image_turn = users[0] if has_image else -1  # the image goes with the first user turn (after any system turn)
        out = []
        for i, message in enumerate(messages):
            parts = [{"type": "text", "text": message["content"]}]
            if i == image_turn:
                parts.insert(0, {"type": "image"})
            out.append({"role": message["role"], "content": parts})
        return out

    def render(self, messages: Sequence[Message], has_image: bool, add_generation_prompt: bool) -> str:
        if has_image and not self.multimodal:
            raise ValueError("this model has no image processor: it takes text-only prompts (image None)")
        return self.processor.apply_chat_template(
            self._template_messages(messages, has_image), add_generation_prompt=add_generation_prompt, tokenize=False
        )

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # -- prompts -------------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[Prompt]) -> dict[str, torch.Tensor]:
        """Left-padded model inputs for prompts that all have an image, or all have none."""
        with_image = [image is not None for _, image in prompts]
        if any(with_image) and not all(with_image):
            raise ValueError("a batch must be all image prompts or all text-only prompts")
        texts = [self.render(messages, image is not None, add_generation_prompt=True) for messages, image in prompts]
        kwargs = dict(padding=True, padding_side="left", return_tensors="pt", add_special_tokens=False)
        if all(with_image) and prompts:
            # Nested: one list of images per sample (Mllama insists; the others accept it).
            images = [[_to_pil(image)] for _, image in prompts]
            return dict(self.processor(text=texts, images=images, **kwargs))
        return dict(self.tokenizer(texts, **kwargs))

    def append(
        self, inputs: dict[str, torch.Tensor], continuations: Sequence[Sequence[int]]
    ) -> dict[str, torch.Tensor]:
        """Append per-row token ids after left-padded prompt inputs, packed (see the module's docstring): row
        ``r``'s continuation fills its last ``len(continuations[r])`` columns."""
        input_ids = inputs["input_ids"]
        batch, length = input_ids.shape
        width = max((len(c) for c in continuations), default=0)
        ids = torch.full((batch, width), self.tokenizer.pad_token_id, dtype=input_ids.dtype)
        mask = torch.zeros((batch, width), dtype=inputs["attention_mask"].dtype)
        for row, cont in enumerate(continuations):
            ids[row, : len(cont)] = torch.as_tensor(list(cont), dtype=input_ids.dtype)
            mask[row, : len(cont)] = 1
        out = dict(inputs)
        out["input_ids"] = torch.cat([input_ids, ids], dim=1)
        out["attention_mask"] = torch.cat([inputs["attention_mask"], mask], dim=1)
        for key in per_token_keys(inputs):
            value = inputs[key]
            if key in _TEXT_KEYS:
                continue
            if key in REPEAT_LAST_ROW:
                extra = value[:, -1:].expand(-1, width, *value.shape[2:])
            elif key in PAD_WITH_ZERO:
                extra = value.new_zeros((batch, width, *value.shape[2:]))
            else:
                raise NotImplementedError(f"do not know how to extend the per-token input {key!r} over appended tokens")
            out[key] = torch.cat([value, extra], dim=1)
        return _packed(out, [width - len(c) for c in continuations])

    # -- SFT -------------------------------------------------------------------------------------------------
    def sft_row(self, conversation: Prompt, all_turns: bool = False) -> SftRow:
        """Split a conversation at its first assistant turn; label the *final* assistant turn's tokens through
        its end-of-turn token, nothing else. Earlier assistant turns are context, like the user turns: in a
        revision conversation (the paper's multi-turn SFT ablation, App. C.1) they are the wrong answers the
        feedback refers to, and the loss must cover the correction only. ``all_turns``: label every assistant
        turn (each through its end-of-turn token), as conversational SFT data is usually trained."""
        messages, image = conversation
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not turns or turns[-1] != len(messages) - 1:
            raise ValueError("an SFT conversation must end with an assistant turn")
        if turns[0] == 0:
            raise ValueError("an SFT conversation must start with a user turn, not an assistant turn")
        has_image = image is not None
        rendered = self.render(messages[: turns[0]], has_image, add_generation_prompt=True)
        ids: list[int] = []
        labelled: list[bool] = []
        for k, turn in enumerate(turns):
            if k > 0:  # the turns between two assistant turns, up to the next generation prompt
                rendered = self._extend(rendered, messages[:turn], has_image, True, ids, labelled, train=False)
            trained = all_turns or k == len(turns) - 1
            rendered = self._extend(rendered, messages[: turn + 1], has_image, False, ids, labelled, train=trained)
        return SftRow(prompt=(list(messages[: turns[0]]), image), ids=ids, labelled=labelled)

    def _extend(self, rendered, messages, has_image, generation_prompt, ids, labelled, train: bool) -> str:
        full = self.render(messages, has_image, add_generation_prompt=generation_prompt)
        if not full.startswith(rendered):
            raise ValueError(
                "the chat template does not render conversations incrementally (a shorter conversation is not a "
                "prefix of a longer one); SFT labels cannot be placed"
            )
        segment = self.tokenize(full[len(rendered) :])
        ids.extend(segment)
        labelled.extend(self._labelled(segment) if train else [False] * len(segment))
        return full

    def _labelled(self, segment: list[int]) -> list[bool]:
        """Label through the last end-of-turn token; template text after it (e.g. a newline) is not trained on."""
        eos = set(self.eos_ids)
        ends = [i for i, token in enumerate(segment) if token in eos]
        stop = ends[-1] + 1 if ends else len(segment)
        return [i < stop for i in range(len(segment))]


def _packed(inputs: dict[str, torch.Tensor], right_padding: Sequence[int]) -> dict[str, torch.Tensor]:
    """Each row's right padding moved to its front (a per-row rotation of every per-token input), then the front
    columns that are padding in every row dropped."""
    mask = inputs["attention_mask"]
    batch, length = mask.shape
    shift = torch.as_tensor(list(right_padding), dtype=torch.long)
    source = (torch.arange(length)[None, :] - shift[:, None]) % length  # [B, T]: the column each one comes from
    present = mask.gather(1, source).bool().any(0)
    drop = int(present.long().argmax()) if present.any() else 0  # leading columns where no row has a token
    out = dict(inputs)
    for key in per_token_keys(inputs):
        value = inputs[key]
        index = source.view(batch, length, *[1] * (value.dim() - 2)).expand_as(value)
        out[key] = value.gather(1, index)[:, drop:]
    return out


def _to_pil(image):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (H, W, 3) arrays or PIL images, got dtype {array.dtype}")
    return Image.fromarray(array).convert("RGB")


def sft_labels(rows: Sequence[SftRow], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Labels aligned with a packed ``batch["input_ids"]`` (each row's ids in its last columns): the token where
    labelled, IGNORE elsewhere (padding too)."""
    labels = torch.full_like(batch["input_ids"], IGNORE)
    for row, sample in enumerate(rows):
        flags = torch.tensor(sample.labelled, dtype=torch.bool)
        start = labels.shape[1] - len(sample.ids)
        labels[row, start:] = torch.where(flags, batch["input_ids"][row, start:], IGNORE)
    return labels
