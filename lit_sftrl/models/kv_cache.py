"""Keys and values carried from one turn of a conversation to the next (prefix caching for rollouts).

Each turn of a multi-turn episode sends the model the same conversation again, one answer and one feedback
message longer. Encoding it whole at every turn made prefill the largest cost of a GP rollout (~650 prompt
tokens by the fifth attempt, of which ~100 are new). A :class:`ConversationCache` keeps the keys and values of
every token the model processed for one conversation; the next turn reuses the longest common prefix of token
ids and prefills only the rest.

Why this is exact: a token's keys and values depend only on the tokens before it and on its position, and
positions follow the attention mask (left padding does not shift them), so a reused prefix holds what a fresh
prefill computes (up to float rounding, as with any change of batch shape). Only identical token ids are
reused: an answer that re-tokenises differently inside the next prompt is prefilled again from the first
differing token on.

Images: in cross-attention families (Mllama) text tokens see the image through the cross-attention layers, so a
cache is reused only for the same image; the cross-attention layers themselves hold the image's keys and values,
not the text's, and are recomputed from the pixels at every turn. Families that put image tokens into the text
(LLaVA-like) are not continued for image prompts (see ``Backbone``).

:class:`GrowingLayer` also stops the default cache from concatenating each layer's keys and values at every
decoded token, which copies the whole cache per token (a third of a batched decoding step on a CPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from lit_sftrl.models.encoding import per_token_keys

LayerState = tuple[torch.Tensor, torch.Tensor]


@dataclass
class ConversationCache:
    """Keys and values of one conversation's tokens, on the model's device.

    ``layers[l]`` is ``(keys, values)``, each ``[kv_heads, len(token_ids), head_dim]``, or None for a layer that
    holds no text keys and values (Mllama's cross-attention layers). ``image``: the prompt's image the keys and
    values were computed with (None for text).
    """

    token_ids: torch.Tensor  # [T] CPU
    layers: list[LayerState | None]
    image: Any = None

    def continues(self, image: Any) -> bool:
        """Whether a prompt with ``image`` can continue from this cache (the engine passes the unchanged image as
        the same array, so this is an identity check in practice)."""
        if self.image is None or image is None or self.image is image:
            return self.image is image
        return (
            isinstance(image, np.ndarray) and isinstance(self.image, np.ndarray) and np.array_equal(self.image, image)
        )

    def reusable(self, ids: torch.Tensor) -> int:
        """How many leading tokens of ``ids`` this cache holds. The last token of ``ids`` is never counted: its
        forward gives the logits of the answer's first token (and the value head's input)."""
        n = min(len(self.token_ids), len(ids) - 1)
        if n <= 0:
            return 0
        differ = (self.token_ids[:n] != ids[:n]).nonzero()
        return int(differ[0, 0]) if len(differ) else n

    @property
    def layout(self) -> tuple[bool, ...]:
        """Which layers hold something: caches can only be batched together with the same layout."""
        return tuple(layer is not None for layer in self.layers)


class GrowingLayer(DynamicLayer):
    """A :class:`DynamicLayer` that writes new keys and values into spare capacity instead of concatenating.
    Attention sees a view of the filled part; the buffer doubles when a sequence outgrows it."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self._buffers: LayerState | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> LayerState:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.get_seq_length()
        end = start + key_states.shape[-2]
        if not self._backs_keys() or end > self._buffers[0].shape[-2]:
            self._reallocate(key_states, value_states, start, max(end, self.capacity, 2 * start))
        keys, values = self._buffers
        keys[..., start:end, :] = key_states
        values[..., start:end, :] = value_states
        self.keys, self.values = keys[..., :end, :], values[..., :end, :]
        return self.keys, self.values

    def _backs_keys(self) -> bool:
        """False before the first write, and after anything outside :meth:`update` replaced the keys
        (``batch_select_indices``, ``reset``): the buffers no longer hold them."""
        return (
            self._buffers is not None and self.keys.numel() > 0 and self.keys.data_ptr() == self._buffers[0].data_ptr()
        )

    def _reallocate(self, key_states: torch.Tensor, value_states: torch.Tensor, start: int, capacity: int) -> None:
        keys = key_states.new_zeros((*key_states.shape[:-2], capacity, key_states.shape[-1]))
        values = value_states.new_zeros((*value_states.shape[:-2], capacity, value_states.shape[-1]))
        if start:
            keys[..., :start, :] = self.keys
            values[..., :start, :] = self.values
        self._buffers = (keys, values)


def new_cache(text_config, capacity: int, with_images: bool = False) -> DynamicCache | None:
    """A model's default dynamic cache with its layers growing into ``capacity`` tokens. None where transformers'
    own cache must serve: models with other than full-attention layers (sliding windows, linear attention), and
    image prompts of families that put image tokens into the text (their pixels enter inside the prefill)."""
    if with_images and not getattr(text_config, "cross_attention_layers", None):
        return None
    cache = DynamicCache(config=text_config)
    if any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    cache.layers = [GrowingLayer(capacity) for _ in cache.layers]
    return cache


def text_layers(text_config) -> list[int]:
    """The layers whose keys and values belong to text tokens (all but Mllama's cross-attention layers)."""
    cross_attention = set(getattr(text_config, "cross_attention_layers", None) or ())
    return [i for i in range(text_config.num_hidden_layers) if i not in cross_attention]


def continue_batch(
    cache: DynamicCache, prefixes: Sequence[ConversationCache | None], inputs: dict[str, torch.Tensor],
    images: Sequence[Any], pad_id: int,
) -> dict[str, torch.Tensor]:
    """Load each row's reusable prefix into the empty ``cache`` and lay the batch out to continue from it.

    The processor's left-padded rows are re-laid as ``[padding, reused tokens | padding, new tokens]``: the
    first ``max(reused)`` columns are the cache (each row's prefix right-aligned), the rest holds each row's
    remaining tokens right-aligned, so the prefill is only as wide as the most new tokens of any row. The gap
    a row may have between the two parts is masked out; positions follow the mask, so they are unchanged. Every
    per-token input (``input_ids``, ``attention_mask``, Mllama's ``cross_attention_mask``...) moves with its
    tokens. Returns the new inputs (the given ones when nothing is reusable).
    """
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    layout = next((p.layout for p in prefixes if p is not None and len(p.layers) == len(cache.layers)), None)
    sources = [mask.nonzero()[:, 0] for mask in attention_mask]
    reused = [
        prefix.reusable(input_ids[row, sources[row]].to(prefix.token_ids.device))
        if prefix is not None and prefix.layout == layout and prefix.continues(image) else 0
        for row, (prefix, image) in enumerate(zip(prefixes, images))
    ]
    cached = max(reused)
    if cached == 0:
        return inputs
    width = cached + max(len(columns) - n for columns, n in zip(sources, reused))
    targets = [
        torch.cat(
            [torch.arange(cached - n, cached), torch.arange(width - (len(columns) - n), width)]
        ).to(columns.device)
        for columns, n in zip(sources, reused)
    ]
    batch = input_ids.shape[0]
    laid_out = dict(inputs)
    for key in per_token_keys(inputs):
        value = inputs[key]
        moved = value.new_full((batch, width, *value.shape[2:]), pad_id if key == "input_ids" else 0)
        for row, (source, target) in enumerate(zip(sources, targets)):
            moved[row, target] = value[row, source]
        laid_out[key] = moved
    for index, layer in enumerate(cache.layers):
        if layout[index]:
            sample = next(p.layers[index] for p, n in zip(prefixes, reused) if n)
            keys, values = (t.new_zeros((batch, t.shape[0], cached, t.shape[-1])) for t in sample)
            for row, (prefix, n) in enumerate(zip(prefixes, reused)):
                if n:
                    keys[row, :, cached - n :], values[row, :, cached - n :] = (t[:, :n] for t in prefix.layers[index])
            layer.update(keys, values)
    return laid_out


def split_rows(
    cache: DynamicCache, sequences: torch.Tensor, attention_mask: torch.Tensor, answer_lengths: Sequence[int],
    images: Sequence[Any], text_layers: Sequence[int],
) -> list[ConversationCache]:
    """One :class:`ConversationCache` per row after ``generate``: the keys and values of ``text_layers`` at the
    row's prompt tokens (where ``attention_mask``, the prompt's, is set) and at the answer tokens that were fed
    back (all sampled tokens but the last step's)."""
    width = attention_mask.shape[1]
    held = cache.get_seq_length(text_layers[0])
    caches = []
    for row, length in enumerate(answer_lengths):
        columns = torch.cat([attention_mask[row].nonzero()[:, 0],
                             torch.arange(width, min(width + length, held), device=attention_mask.device)])
        layers: list[LayerState | None] = [None] * len(cache.layers)
        for index in text_layers:
            layer = cache.layers[index]
            layers[index] = (layer.keys[row][:, columns], layer.values[row][:, columns])
        caches.append(ConversationCache(sequences[row, columns].cpu(), layers, images[row]))
    return caches
