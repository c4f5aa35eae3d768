"""In-flight batched decoding: a fixed number of slots, rows leave the batch the step their answer ends, and
waiting prompts are prefilled and join the running batch.

``Backbone.generate`` (transformers' loop) decodes a batch until its longest answer ends: rows that finished
keep riding along, and the next prompts wait for the whole batch. A trained model's answers end at very
different lengths, so most of a lockstep batch's late steps were spent on finished rows.

Exactness: each row computes what ``generate`` computes for it alone, up to float rounding from the batch
shape. Positions follow each row's attention mask, so left padding added when rows of different widths are
merged does not shift them; padded columns are masked out. Sampling is per row (its own seeded generator,
one draw per decoded token, the same Gumbel-max draw as :class:`SeededSampler`), so a row samples the same
tokens whichever rows share its batch and whenever it joined. Log-probs use :func:`masked_log_probs` exactly
as generation and scoring do.

Cache layout: one :class:`GrowingLayer` per layer, ``[rows, kv_heads, columns, head_dim]``; all rows share the
current column. Text layers are right-aligned (each row's tokens end at the last column); Mllama's cross-attention
layers hold each row's image keys and values (same width for every image row). The batch is re-assembled only
on a step where rows leave or join: it drops the columns that are padding for every remaining row and left-pads
the narrower side.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from lit_sftrl.models.config import Generation, Prompt, SamplingConfig
from lit_sftrl.models.encoding import per_token_keys
from lit_sftrl.models.kv_cache import ConversationCache, GrowingLayer, new_cache, text_layers
from lit_sftrl.models.sampling import _top_p_filter, masked_log_probs


@dataclass
class Request:
    """One prompt to answer: its conversation cache from the previous turn (or None), its sampling seed, and a tag
    that comes back with its :class:`Generation`."""

    prompt: Prompt
    cache: ConversationCache | None = None
    seed: int | None = None
    tag: Any = None


@dataclass
class _Row:
    request: Request
    generator: torch.Generator | None
    prompt_ids: torch.Tensor  # [T] the row's prompt tokens (cached prefix included), CPU
    prompt_tokens: int  # FLOPs accounting, as generate counts it
    value: float | None
    keep_cache: bool
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


@dataclass
class _Joining:
    """Prompts prefilled together, ready to join the batch: their rows, keys and values, attention mask, next
    positions, first answer tokens and (Mllama images) cross-attention mask column."""

    rows: list[_Row]
    cache: DynamicCache
    mask: torch.Tensor
    positions: torch.Tensor
    tokens: torch.Tensor
    cross: torch.Tensor | None


def supports_inflight(backbone: Any) -> bool:
    """Whether :class:`InflightDecoder` can drive this backbone: a real :class:`Backbone` whose model takes
    plain ``[batch, tokens]`` position ids (positions must follow each row's mask) and whose layers are all full
    attention. Models with their own position rule (Qwen-VL's 3-D rotary positions) decode in lockstep."""
    from transformers import GenerationMixin

    from lit_sftrl.models.backbone import Backbone

    if not isinstance(backbone, Backbone) or not backbone._accepts_position_ids:
        return False
    model = backbone.model.get_base_model() if hasattr(backbone.model, "get_base_model") else backbone.model
    plain_positions = (
        getattr(type(model), "_prepare_position_ids_for_generation", None)
        is GenerationMixin._prepare_position_ids_for_generation
    )
    return plain_positions and new_cache(backbone._text_config, 1) is not None


class LockstepDecoder:
    """The same interface over ``generate``: every waiting prompt is answered in one batched call, which
    decodes until its longest answer ends (the engine before in-flight batching; any backbone with a
    ``generate`` method, e.g. test doubles)."""

    def __init__(self, backbone: Any, sampling: SamplingConfig, slots: int) -> None:
        self.backbone, self.sampling, self.slots = backbone, sampling, slots
        self.pending: list[Request] = []

    def __len__(self) -> int:
        return len(self.pending)

    def __enter__(self) -> LockstepDecoder:
        return self  # each generate call sets the model's mode itself

    def __exit__(self, *exc_info: Any) -> None:
        pass

    def submit(self, request: Request) -> None:
        self.pending.append(request)

    def step(self) -> list[tuple[Any, Generation]]:
        batch, self.pending = self.pending, []
        if not batch:
            return []
        generations = self.backbone.generate(
            [r.prompt for r in batch], self.sampling, [r.cache for r in batch],
            seeds=None if any(r.seed is None for r in batch) else [r.seed for r in batch],
        )
        return [(r.tag, g) for r, g in zip(batch, generations)]


class InflightDecoder:
    """Decodes up to ``slots`` answers at once; :meth:`step` lets the rows that ended leave and admits waiting
    prompts into the free slots (one batched prefill for new conversations and one for continued ones, one
    re-assembly of the batch), decodes one token for every running row, and returns the rows whose answer ended.

    Prompts join in groups of at least ``min_join`` (default half the slots) while enough rows keep
    decoding: each join costs a prefill forward and a copy of every row's keys and values, so joining one row per
    step cost more than the slot it filled (``bench/rollout.py``). A batch holds image prompts or text prompts,
    never both (the families' forwards take one or the other); prompts of the other kind wait until the running
    batch has drained.
    """

    def __init__(self, backbone: Any, sampling: SamplingConfig, slots: int, min_join: int | None = None) -> None:
        self.backbone, self.sampling, self.slots = backbone, sampling, slots
        self.min_join = max(1, slots // 2) if min_join is None else max(1, min_join)
        self.waiting: list[Request] = []
        self.rows: list[_Row] = []
        self.leaving: list[int] = []  # rows whose answer ended: they leave at the next re-assembly
        self.cache: DynamicCache | None = None
        self.mask = self.positions = self.last = self.cross_mask = None  # per-row batch tensors
        self.with_images: bool | None = None
        self.text_layers = set(text_layers(backbone._text_config))
        self.forward_seconds = {"prefill": 0.0, "steps": 0.0}

    def __len__(self) -> int:
        return len(self.waiting) + self.running

    def __enter__(self) -> InflightDecoder:
        """Hold the model in eval mode while decoding: otherwise every step switches it there and back."""
        self._held = contextlib.ExitStack()
        self._held.enter_context(self.backbone._eval_mode())
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._held.close()

    @property
    def running(self) -> int:
        """Rows still decoding."""
        return len(self.rows) - len(self.leaving)

    def submit(self, request: Request) -> None:
        self.waiting.append(request)

    # -- the loop -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[tuple[Any, Generation]]:
        with self.backbone._eval_mode():
            self._refill()
            done = self._retire()
            if self.running:
                self._decode()
                done += self._retire()
            if self.rows and not self.running and not self.waiting:
                self._assemble(keep=self._staying(), joining=[])  # all answered: release the batch
        return done

    def _staying(self) -> list[int]:
        leaving, self.leaving = set(self.leaving), []
        return [i for i in range(len(self.rows)) if i not in leaving]

    def _refill(self) -> None:
        """Waiting prompts join, and the rows that ended leave, in one re-assembly of the batch. Until then the
        ended rows ride along, their tokens ignored: the batch never holds more than ``slots`` rows, and a decoding
        step costs about the same with them as without."""
        live = self.running
        kind = self.with_images if live else (self.waiting[0].prompt[1] is not None if self.waiting else None)
        joining = [r for r in self.waiting if (r.prompt[1] is not None) == kind][: self.slots - live]
        if not joining or (len(joining) < self.min_join and live >= self.min_join):
            return  # nothing to admit, or wait for more company while the batch is still busy
        self.waiting = [r for r in self.waiting if all(r is not j for j in joining)]
        self.with_images = kind
        # A prompt that continues its conversation prefills its new tokens only (tens), a new episode its whole
        # prompt (hundreds): one forward each, so that the short ones are not padded to the long ones' width.
        groups = ([r for r in joining if r.cache is None], [r for r in joining if r.cache is not None])
        self._assemble(keep=self._staying(), joining=[self._prefill(group) for group in groups if group])

    def _prefill(self, requests: list[Request]) -> _Joining:
        """One forward over the joining prompts, continued from their conversation caches where they hold some, and
        their first answer tokens."""
        backbone, model = self.backbone, self.backbone.model
        prompts = [r.prompt for r in requests]
        caches = [r.cache for r in requests]
        inputs, cache, keep = backbone._model_inputs(prompts, caches, self.sampling.max_new_tokens)
        if cache is None:  # image tokens inside the text (LLaVA): transformers' own layers, copied out below
            cache = DynamicCache(config=backbone._text_config)
        inputs = backbone._with_position_ids(model, inputs)
        past = cache.get_seq_length()
        cut = set(per_token_keys(inputs)) - {"attention_mask"}
        run = {key: value[:, past:] if key in cut and past else value for key, value in inputs.items()}
        kwargs = {"logits_to_keep": 1} if backbone._accepts_logits_to_keep else {}
        capture = backbone.value_head is not None
        start = time.perf_counter()
        with backbone._final_hidden.capture(capture) as store:
            logits = model(**run, cache=cache, use_cache=True, **kwargs).logits[:, -1]
        self.forward_seconds["prefill"] += time.perf_counter() - start
        values = backbone.value_head(store[0][:, -1]).tolist() if capture else [None] * len(requests)
        counts = backbone.token_counts(inputs).tolist()
        rows = []
        for i, request in enumerate(requests):
            generator = None
            if self.sampling.temperature > 0:
                seed = request.seed if request.seed is not None else int(torch.randint(2**62, ()))
                generator = torch.Generator(device=logits.device).manual_seed(int(seed))
            ids = inputs["input_ids"][i][inputs["attention_mask"][i].bool()].cpu()
            rows.append(_Row(request, generator, ids, int(counts[i]), values[i], keep))
        cross = inputs["cross_attention_mask"][:, -1:] if "cross_attention_mask" in inputs else None
        positions = inputs["position_ids"][:, -1] + 1
        return _Joining(rows, cache, inputs["attention_mask"], positions, self._choose(logits, rows), cross)

    def _decode(self) -> None:
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        inputs = {"input_ids": self.last[:, None], "attention_mask": self.mask, "position_ids": self.positions[:, None]}
        if self.cross_mask is not None:
            inputs["cross_attention_mask"] = self.cross_mask
        kwargs = {"logits_to_keep": 1} if self.backbone._accepts_logits_to_keep else {}
        start = time.perf_counter()
        logits = self.backbone.model(**inputs, cache=self.cache, use_cache=True, **kwargs).logits[:, -1]
        self.forward_seconds["steps"] += time.perf_counter() - start
        self.positions = self.positions + 1
        self.last = self._choose(logits, self.rows)

    def _choose(self, logits: torch.Tensor, rows: Sequence[_Row]) -> torch.Tensor:
        """Each row's next token: greedy, or its own seeded Gumbel-max draw (what SeededSampler draws)."""
        suppressed = self.backbone._suppressed_mask
        temperature, top_p = self.sampling.temperature, self.sampling.top_p
        scores = logits.float().masked_fill(suppressed.to(logits.device), float("-inf"))
        if temperature > 0:
            scaled = scores / temperature
            if top_p < 1.0:
                scaled = _top_p_filter(scaled, top_p)
            uniform = torch.stack(
                [torch.rand(scores.shape[-1], generator=row.generator, device=scores.device) for row in rows]
            )
            scores = scaled - torch.log(-torch.log(uniform.clamp_min(1e-20)))
        tokens = scores.argmax(-1)
        chosen = masked_log_probs(logits, temperature, suppressed).gather(-1, tokens[:, None])[:, 0]
        for row, token, logprob in zip(rows, tokens.tolist(), chosen.tolist()):
            row.tokens.append(token)
            row.logprobs.append(logprob)
        return tokens

    def _retire(self) -> list[tuple[Any, Generation]]:
        """The rows whose answer ended this step; they stay in the batch (their further tokens ignored) until it is
        re-assembled, so that leaving and joining cost one re-assembly."""
        eos, cap, leaving = set(self.backbone.eos_ids), self.sampling.max_new_tokens, set(self.leaving)
        ended = [
            i for i, row in enumerate(self.rows)
            if i not in leaving and (row.tokens[-1] in eos or len(row.tokens) >= cap)
        ]
        self.leaving += ended
        return [(self.rows[i].request.tag, self._generation(i)) for i in ended]

    # -- batch bookkeeping ---------------------------------------------------------------------------------------
    def _generation(self, i: int) -> Generation:
        row, backbone = self.rows[i], self.backbone
        answer = torch.tensor(row.tokens, dtype=torch.long)
        backbone.cap_counts["answers"] += 1
        backbone.cap_counts["at_cap"] += len(row.tokens) >= self.sampling.max_new_tokens
        return Generation(
            prompt_ids=row.prompt_ids, answer_ids=answer,
            text=backbone.tokenizer.decode(answer, skip_special_tokens=True),
            logprobs=torch.tensor(row.logprobs, dtype=torch.float32), value=row.value,
            num_tokens=row.prompt_tokens + len(row.tokens),
            cache=self._conversation_cache(i) if row.keep_cache else None,
        )

    def _conversation_cache(self, i: int) -> ConversationCache:
        """The row's keys and values at every token it fed: its prompt and all sampled tokens but the last."""
        row = self.rows[i]
        columns = self.mask[i].nonzero()[:, 0]
        layers = [
            (layer.keys[i][:, columns], layer.values[i][:, columns]) if index in self.text_layers else None
            for index, layer in enumerate(self.cache.layers)
        ]
        ids = torch.cat([row.prompt_ids, torch.tensor(row.tokens[:-1], dtype=torch.long)])
        return ConversationCache(ids, layers, row.request.prompt[1])

    def _assemble(self, keep: list[int], joining: list[_Joining]) -> None:
        """Rebuild the batch from the kept rows and the joining ones: the text layers' columns right-aligned into
        the narrowest width that holds every row, with room to decode the rest of the answers."""
        parts = []  # (cache, rows index, mask, first column to keep)
        if keep:
            index = torch.tensor(keep, device=self.mask.device)
            first = int(self.mask[index].any(0).nonzero()[0, 0])
            parts.append((self.cache, index, self.mask[index, first:], first))
        parts += [(join.cache, None, join.mask, 0) for join in joining]
        self.rows = [self.rows[i] for i in keep] + [row for join in joining for row in join.rows]
        if not self.rows:
            self.cache = self.mask = self.positions = self.last = self.cross_mask = None
            return
        width = max(mask.shape[1] for _, _, mask, _ in parts)
        self.mask = torch.cat([_left_pad(mask, width) for _, _, mask, _ in parts])
        self.positions = _cat([self.positions[index] if keep else None, *(join.positions for join in joining)])
        self.last = _cat([self.last[index] if keep else None, *(join.tokens for join in joining)])
        old_cross = self.cross_mask[index] if keep and self.cross_mask is not None else None
        self.cross_mask = _cat([old_cross, *(join.cross for join in joining)])
        capacity = width + self.sampling.max_new_tokens
        layers = []
        for number in range(len(parts[0][0].layers)):
            pieces = []
            for cache, index, _, first in parts:
                layer = cache.layers[number]
                if not layer.is_initialized or layer.keys.numel() == 0:
                    continue
                keys, values = layer.keys, layer.values
                if index is not None:
                    keys, values = keys[index], values[index]
                if number in self.text_layers:
                    keys, values = keys[..., first:, :], values[..., first:, :]
                pieces.append((keys, values))
            aligned = number in self.text_layers
            layers.append(_stacked(pieces, width if aligned else None, capacity if aligned else None))
        self.cache = DynamicCache(config=self.backbone._text_config)
        self.cache.layers = layers


def _cat(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    present = [t for t in tensors if t is not None]
    return torch.cat(present) if present else None


def _left_pad(tensor: torch.Tensor, width: int, dim: int = 1) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _stacked(pieces: list[tuple[torch.Tensor, torch.Tensor]], width: int | None, capacity: int | None) -> GrowingLayer:
    """One layer of the batch: ``pieces`` stacked over rows, each right-aligned at column ``width`` (None: the
    pieces' own common width, for image keys) of a buffer with ``capacity`` columns."""
    if not pieces:
        return GrowingLayer(capacity or 1)  # nothing cached here (Mllama's cross-attention layers, text prompts)
    width = width or pieces[0][0].shape[-2]
    capacity = capacity or width
    sample = pieces[0][0]
    rows = sum(keys.shape[0] for keys, _ in pieces)
    buffers = tuple(sample.new_zeros((rows, sample.shape[1], capacity, sample.shape[-1])) for _ in range(2))
    row = 0
    for keys, values in pieces:
        n, w = keys.shape[0], keys.shape[-2]
        buffers[0][row : row + n, :, width - w : width] = keys
        buffers[1][row : row + n, :, width - w : width] = values
        row += n
    layer = GrowingLayer(capacity)
    layer.lazy_initialization(sample, sample)
    layer._buffers = buffers
    layer.keys, layer.values = buffers[0][..., :width, :], buffers[1][..., :width, :]
    return layer


def decode_all(decoder: Any, requests: Sequence[Request], on_done: Callable | None = None) -> list[Generation]:
    """Answers to ``requests`` in their order (for tests and benches that have everything to submit up front)."""
    for n, request in enumerate(requests):
        decoder.submit(Request(request.prompt, request.cache, request.seed, tag=n))
    results: dict[int, Generation] = {}
    while len(decoder):
        for n, generation in decoder.step():
            results[n] = generation
            if on_done is not None:
                on_done(requests[n].tag, generation)
    return [results[n] for n in range(len(requests))]
