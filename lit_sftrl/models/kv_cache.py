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

:class:`GrowingLayer` also stops the default cache from concatenating each layer's keys and values at every
decoded token, which copies the whole cache per token (a third of a batched decoding step on a CPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

LayerState = tuple[torch.Tensor, torch.Tensor]


@dataclass
class ConversationCache:
    """Keys and values of one conversation's tokens, on the model's device.

    ``layers[l]`` is ``(keys, values)``, each ``[kv_heads, len(token_ids), head_dim]``, or None for a layer that
    holds nothing for text (Mllama's cross-attention layers when there is no image).
    """

    token_ids: torch.Tensor  # [T] CPU
    layers: list[LayerState | None]

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

    @property
    def num_bytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in filter(None, self.layers))


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
        return self._buffers is not None and self.keys.numel() > 0 and self.keys.data_ptr() == self._buffers[0].data_ptr()

    def _reallocate(self, key_states: torch.Tensor, value_states: torch.Tensor, start: int, capacity: int) -> None:
        keys = key_states.new_zeros((*key_states.shape[:-2], capacity, key_states.shape[-1]))
        values = value_states.new_zeros((*value_states.shape[:-2], capacity, value_states.shape[-1]))
        if start:
            keys[..., :start, :] = self.keys
            values[..., :start, :] = self.values
        self._buffers = (keys, values)


def new_cache(text_config, capacity: int) -> DynamicCache | None:
    """A model's default dynamic cache with its layers growing into ``capacity`` tokens; None for models with
    other than full-attention layers (sliding windows, linear attention), which keep transformers' own cache
    and are never continued from a prefix."""
    cache = DynamicCache(config=text_config)
    if any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    cache.layers = [GrowingLayer(capacity) for _ in cache.layers]
    return cache


def continue_batch(
    cache: DynamicCache, prefixes: Sequence[ConversationCache | None], input_ids: torch.Tensor,
    attention_mask: torch.Tensor, pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load each row's reusable prefix into the empty ``cache`` and lay the batch out to continue from it.

    The tokenizer's left-padded rows are re-laid as ``[padding, reused tokens | padding, new tokens]``: the
    first ``max(reused)`` columns are the cache (each row's prefix right-aligned), the rest holds each row's
    remaining tokens right-aligned, so the prefill is only as wide as the most new tokens of any row. The gap
    a row may have between the two parts is masked out; positions follow the mask, so they are unchanged.
    Returns the new ``input_ids`` and ``attention_mask`` (the given ones when nothing is reusable).
    """
    layout = next((p.layout for p in prefixes if p is not None and len(p.layers) == len(cache.layers)), None)
    rows = [ids[mask.bool()] for ids, mask in zip(input_ids, attention_mask)]
    reused = [
        prefix.reusable(ids.to(prefix.token_ids.device)) if prefix is not None and prefix.layout == layout else 0
        for ids, prefix in zip(rows, prefixes)
    ]
    cached = max(reused)
    if cached == 0:
        return input_ids, attention_mask
    width = cached + max(len(ids) - n for ids, n in zip(rows, reused))
    new_ids = torch.full((len(rows), width), pad_id, dtype=input_ids.dtype, device=input_ids.device)
    new_mask = torch.zeros((len(rows), width), dtype=attention_mask.dtype, device=attention_mask.device)
    for row, (ids, n) in enumerate(zip(rows, reused)):
        new_ids[row, cached - n : cached], new_ids[row, width - (len(ids) - n) :] = ids[:n], ids[n:]
        new_mask[row, cached - n : cached] = new_mask[row, width - (len(ids) - n) :] = 1
    for index, layer in enumerate(cache.layers):
        if layout[index]:
            sample = next(p.layers[index] for p, n in zip(prefixes, reused) if n)
            keys, values = (t.new_zeros((len(rows), t.shape[0], cached, t.shape[-1])) for t in sample)
            for row, (prefix, n) in enumerate(zip(prefixes, reused)):
                if n:
                    keys[row, :, cached - n :], values[row, :, cached - n :] = (t[:, :n] for t in prefix.layers[index])
            layer.update(keys, values)
    return new_ids, new_mask


def split_rows(
    cache: DynamicCache, sequences: torch.Tensor, attention_mask: torch.Tensor, answer_lengths: Sequence[int]
) -> list[ConversationCache]:
    """One :class:`ConversationCache` per row after ``generate``: the row's prompt tokens (where ``attention_mask``,
    the prompt's, is set) and the answer tokens that were fed back (all sampled tokens but the last step's)."""
    width = attention_mask.shape[1]
    held = cache.get_seq_length()
    caches = []
    for row, length in enumerate(answer_lengths):
        columns = torch.cat([attention_mask[row].nonzero()[:, 0], torch.arange(width, min(width + length, held), device=attention_mask.device)])
        layers: list[LayerState | None] = []
        for layer in cache.layers:
            holds_text = layer.is_initialized and layer.keys is not None and layer.keys.shape[-2] == held
            layers.append((layer.keys[row][:, columns], layer.values[row][:, columns]) if holds_text else None)
        caches.append(ConversationCache(sequences[row, columns].cpu(), layers))
    return caches
