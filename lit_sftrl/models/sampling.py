"""Pieces of batched generation and scoring that do not depend on the wrapper: the log-prob convention, a
memory-light log-prob recorder for ``generate``, a clean generation config, and the final-hidden-state hook."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from lit_sftrl.models.config import SamplingConfig

_MASKED = -1e30  # finite, so 0 * logp stays 0 for suppressed tokens (entropy) and no NaN reaches the gradients


def masked_log_probs(logits: torch.Tensor, temperature: float, suppressed: torch.Tensor) -> torch.Tensor:
    """fp32 log-softmax of ``logits / T`` over the vocabulary with ``suppressed`` (bool [V]) tokens removed.
    ``T <= 0`` (greedy) counts as 1. Generation and scoring both use exactly this."""
    scaled = logits.float() / (temperature if temperature > 0 else 1.0)
    return torch.log_softmax(scaled.masked_fill(suppressed.to(scaled.device), _MASKED), dim=-1)


# Vocabulary entries expanded at once: 16 MB in fp32, 85 positions of a 49k vocabulary. Smaller chunks ran up to
# 1.6x slower (more, smaller kernels); the chunk buffers are allocated once per pass and reused, because a fresh
# 16 MB block per chunk fragmented glibc's heap (blocks under its 32 MB mmap threshold) and raised the peak.
ELEMENTS_PER_CHUNK = 2**22


def sampled_log_probs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, suppressed: torch.Tensor,
    rows_per_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log-prob of each target token, entropy)`` under :func:`masked_log_probs`, both [...] fp32 for
    ``logits`` [..., V] and ``targets`` [...], without a full-vocabulary log-softmax of the whole batch.

    The plain form keeps ~5 fp32 tensors of the logits' size alive (the scaled and masked logits, the
    log-softmax, its exponential, their product), most of them until the backward pass. Here a chunk of
    ``rows_per_chunk`` positions (default: :data:`ELEMENTS_PER_CHUNK` entries' worth) is expanded at a time, in
    the forward and again in the backward: what stays is
    the logits themselves, plus per position the log-normaliser and the entropy (as TRL's selective log-softmax
    and Liger's fused losses do, and with the entropy's gradient too, for ``entropy_coef``).
    """
    rows = rows_per_chunk or max(1, ELEMENTS_PER_CHUNK // logits.shape[-1])
    return _SampledLogProbs.apply(logits, targets, temperature if temperature > 0 else 1.0, suppressed, rows)


class _SampledLogProbs(torch.autograd.Function):
    """With s = logits / T (suppressed tokens masked), p = softmax(s), H = -sum p log p: d log p_y / ds = onehot(y)
    - p and dH / ds = -p (log p + H); both through 1 / T to the logits. The backward rebuilds log p from the
    saved log-normaliser: one exponential per entry, as the plain form's backward. Each pass reuses one or two
    chunk-sized buffers: no allocation per chunk, so nothing for the allocator to fragment."""

    @staticmethod
    def _log_probs(flat, suppressed, temperature, start, stop, out, normaliser=None):
        """log p of rows ``start:stop`` into ``out`` (given the rows' log-normaliser, or computing it)."""
        out = out[: stop - start]
        torch.div(flat[start:stop], temperature, out=out)
        out.masked_fill_(suppressed, _MASKED)
        if normaliser is None:
            normaliser = torch.logsumexp(out, dim=-1)
        out -= normaliser[:, None]
        return out, normaliser

    @staticmethod
    def forward(ctx, logits, targets, temperature, suppressed, rows_per_chunk):
        flat, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1, 1)
        suppressed = suppressed.to(logits.device)
        chosen = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
        entropy, normaliser = torch.empty_like(chosen), torch.empty_like(chosen)
        rows = min(rows_per_chunk, flat.shape[0])
        logp_buffer = torch.empty(rows, flat.shape[1], dtype=torch.float32, device=logits.device)
        probs_buffer = torch.empty_like(logp_buffer)
        for start in range(0, flat.shape[0], rows_per_chunk):
            stop = min(start + rows_per_chunk, flat.shape[0])
            logp, normaliser[start:stop] = _SampledLogProbs._log_probs(flat, suppressed, temperature, start, stop,
                                                                       logp_buffer)
            chosen[start:stop] = logp.gather(-1, flat_targets[start:stop]).squeeze(-1)
            probs = torch.exp(logp, out=probs_buffer[: stop - start])
            entropy[start:stop] = -(probs.mul_(logp)).sum(-1)
        ctx.save_for_backward(logits, targets, suppressed, entropy, normaliser)
        ctx.temperature, ctx.rows_per_chunk = temperature, rows_per_chunk
        return chosen.view(targets.shape), entropy.view(targets.shape)

    @staticmethod
    def backward(ctx, grad_chosen, grad_entropy):
        logits, targets, suppressed, entropy, normaliser = ctx.saved_tensors
        flat, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1, 1)
        grad_chosen, grad_entropy = grad_chosen.reshape(-1, 1), grad_entropy.reshape(-1, 1)
        grad = torch.empty_like(flat)
        rows = min(ctx.rows_per_chunk, flat.shape[0])
        buffer = torch.empty(rows, flat.shape[1], dtype=torch.float32, device=flat.device)
        weight_buffer = torch.empty_like(buffer)
        for start in range(0, flat.shape[0], ctx.rows_per_chunk):
            stop = min(start + ctx.rows_per_chunk, flat.shape[0])
            logp, _ = _SampledLogProbs._log_probs(flat, suppressed, ctx.temperature, start, stop, buffer,
                                                  normaliser[start:stop])
            weight = torch.add(logp, entropy[start:stop, None], out=weight_buffer[: stop - start])
            weight.mul_(grad_entropy[start:stop]).add_(grad_chosen[start:stop])  # g_y + g_H (log p + H)
            chunk = logp.exp_().mul_(weight).neg_()  # -p * weight, in the buffer
            chunk.scatter_add_(-1, flat_targets[start:stop], grad_chosen[start:stop])
            chunk.masked_fill_(suppressed, 0.0).div_(ctx.temperature)
            grad[start:stop] = chunk
        return grad.view(logits.shape), None, None, None, None


class LogprobRecorder:
    """A logits processor that records the log-prob of each sampled token without keeping every step's logits
    (``output_logits`` would hold B x steps x vocabulary floats: gigabytes for a 128k vocabulary).

    At step t it sees the token chosen at step t-1 (the last input id) and the previous step's distribution;
    :meth:`finish` adds the final token. Custom processors run after token suppression and before the
    temperature/top-p warpers, so it sees the raw logits (suppressed tokens already at -inf).
    """

    def __init__(self, temperature: float, suppressed: torch.Tensor) -> None:
        self.temperature = temperature
        self.suppressed = suppressed
        self.previous: torch.Tensor | None = None
        self.chosen: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._take(input_ids[:, -1])
        self.previous = masked_log_probs(scores, self.temperature, self.suppressed)
        return scores

    def _take(self, tokens: torch.Tensor) -> None:
        if self.previous is not None:
            self.chosen.append(self.previous.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """[B, new tokens] log-probs, given the sequences ``generate`` returned."""
        self._take(sequences[:, -1])
        self.previous = None
        return torch.stack(self.chosen, dim=1)


class SeededSampler:
    """A logits processor that samples each row from its own seeded generator (Gumbel-max), for ``generate`` in
    greedy mode: the argmax of ``logits / T + Gumbel noise`` (after top-p) is a draw from the top-p-truncated
    ``softmax(logits / T)``.

    A row's draws depend only on its seed and its own logits, never on which other rows share the batch, so an
    episode samples the same answers whether it is played alone, in a batch of 16, or resumed after a restart.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float) -> None:
        if temperature <= 0:
            raise ValueError("SeededSampler samples; use greedy decoding for temperature 0")
        self.seeds, self.temperature, self.top_p = list(seeds), temperature, top_p
        self.generators: list[torch.Generator] | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.generators is None:
            self.generators = [torch.Generator(device=scores.device).manual_seed(int(s)) for s in self.seeds]
        scaled = scores.float() / self.temperature
        if self.top_p < 1.0:
            scaled = _top_p_filter(scaled, self.top_p)
        uniform = torch.stack(
            [torch.rand(scores.shape[-1], generator=g, device=scores.device) for g in self.generators]
        )
        gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-20)))
        return scaled + gumbel


def _top_p_filter(scaled: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``top_p`` (at least one)."""
    ordered, order = scaled.sort(dim=-1, descending=True)
    cumulative = ordered.softmax(-1).cumsum(-1)
    drop_sorted = cumulative - ordered.softmax(-1) >= top_p  # tokens after the mass is already reached
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return scaled.masked_fill(drop, float("-inf"))


def generation_config(
    sampling: SamplingConfig, tokenizer, eos_ids: Sequence[int], suppressed_ids: Sequence[int], seeded: bool = False
):
    """A complete GenerationConfig: nothing left for ``generate`` to fill in from the checkpoint's defaults.
    ``seeded``: a :class:`SeededSampler` does the sampling, so ``generate`` itself decodes greedily."""
    from transformers import GenerationConfig

    sample = sampling.temperature > 0 and not seeded
    return GenerationConfig(
        max_new_tokens=sampling.max_new_tokens,
        do_sample=sample,
        temperature=sampling.temperature if sample else 1.0,
        top_p=sampling.top_p if sample else 1.0,
        top_k=0 if sample else None,  # 0: no top-k truncation; greedy ignores it (and warns if it is set)
        eos_token_id=list(eos_ids),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        suppress_tokens=list(suppressed_ids),
        use_cache=True,
    )


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """No dropout while sampling: the log-probs must be those of the policy scored later. A mode switch walks every
    submodule (a millisecond for the tiny model, a fifth of one of its decoding steps), so a model already in eval
    mode is left alone."""
    if not model.training:
        yield
        return
    model.eval()
    try:
        yield
    finally:
        model.train()


@contextlib.contextmanager
def only_generation_config(model: nn.Module, config) -> Iterator[None]:
    """``generate`` fills unset fields from the checkpoint's generation_config.json (repetition penalty, top-k,
    min length...). Swap it out meanwhile, so the sampling distribution is exactly the configured one."""
    saved = model.generation_config
    model.generation_config = config
    try:
        yield
    finally:
        model.generation_config = saved


def eos_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """End-of-sequence ids: the checkpoint's generation config (Llama 3 lists several) and the tokenizer's."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def suppressed_token_ids(model: nn.Module, tokenizer, eos_ids: Sequence[int]) -> list[int]:
    """Tokens that must never be sampled: special tokens (a sampled image token breaks the next forward) and the
    padded output rows beyond the tokenizer. End-of-sequence tokens stay allowed."""
    vocab = model.get_output_embeddings().out_features
    ids = set(tokenizer.all_special_ids) | set(range(len(tokenizer), vocab))
    for name in ("image_token_id", "image_token_index", "video_token_id"):
        token = getattr(model.config, name, None)
        if isinstance(token, int):
            ids.add(token)
    return sorted(i for i in ids - set(eos_ids) if 0 <= i < vocab)


def answer_length(tokens: torch.Tensor, eos_ids: Sequence[int]) -> int:
    """Tokens up to and including the first end-of-sequence (``generate`` pads rows that finished early)."""
    is_eos = torch.isin(tokens, torch.tensor(list(eos_ids), device=tokens.device))
    return int(is_eos.nonzero()[0, 0]) + 1 if is_eos.any() else tokens.numel()


class FinalHiddenStates:
    """Captures the input of the output layer, i.e. the final normed hidden states, for any family: the value
    head's input. Inactive unless inside :meth:`capture`."""

    def __init__(self, output_layer: nn.Module) -> None:
        self._store: list[torch.Tensor] | None = None
        self._limit = 0
        output_layer.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple) -> None:
        if self._store is not None and len(self._store) < self._limit:
            self._store.append(args[0])

    @contextlib.contextmanager
    def capture(self, enabled: bool = True, calls: int = 1) -> Iterator[list[torch.Tensor]]:
        """Record the first ``calls`` forwards (generation needs only the prefill)."""
        store: list[torch.Tensor] = []
        self._store, self._limit = (store if enabled else None), calls
        try:
            yield store
        finally:
            self._store = None
