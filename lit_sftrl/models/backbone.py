"""The vision-language backbone every LightningModule uses: loading, batched generation, scoring, SFT batches.

Log-prob convention (generation and scoring agree on it to ~1e-6 in fp32): the distribution is
``softmax(logits / T)`` over the vocabulary with the suppressed tokens (image, padding, template and other
special tokens; never end-of-sequence) removed. ``T`` is the sampling temperature (1 for greedy); top-p only
truncates what is sampled, not the reported distribution.

Reference policy (KL term): the model at ``config.path`` (under LoRA the adapter disabled, no copy; under full
fine-tuning a frozen copy, loaded on first use or at construction with ``reference="eager"``), or, for a run
initialised from another one (PPO from SFT), a frozen copy of that run's weights (:meth:`anchor_reference`;
under LoRA a second, frozen adapter over the same base weights).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from lit_sftrl.core.compute import token_counts
from lit_sftrl.models.config import (
    BackboneConfig,
    Generation,
    LoraSettings,
    Message,
    Prompt,
    SamplingConfig,
    Scores,
    as_backbone_config,
)
from lit_sftrl.models.encoding import IGNORE, ChatEncoder, per_token_keys, sft_labels
from lit_sftrl.models.kv_cache import ConversationCache, continue_batch, new_cache, split_rows, text_layers
from lit_sftrl.models.loading import (
    apply_lora,
    check_model_directory,
    checkpointing_in_eval_mode,
    disable_bnb_cpu_repacking,
    load_base_model,
    load_plain_model,
    load_processor,
    logical_num_parameters,
    resolve_backbone_path,
)
from lit_sftrl.models.sampling import (
    FinalHiddenStates,
    LogprobRecorder,
    SeededSampler,
    answer_length,
    eos_token_ids,
    eval_mode,
    generation_config,
    masked_log_probs,
    only_generation_config,
    sampled_log_probs,
    suppressed_token_ids,
)
from lit_sftrl.models.value_head import VALUE_HEAD_FILE, ValueHead
from lit_sftrl.models.weights import add_frozen_adapter_copy, load_trainable, lora_reference

__all__ = ["Backbone", "BackboneConfig", "Generation", "LoraSettings", "Message", "Prompt", "SamplingConfig", "Scores"]


class Backbone(nn.Module):
    """A Hugging Face VLM (or text-only LM) with the options of :class:`BackboneConfig` and an optional value head.

    Attributes: ``config``, ``path`` (resolved), ``processor``, ``tokenizer``, ``model`` (a peft model under
    LoRA), ``value_head`` (or None), ``num_parameters`` (the base architecture's logical parameter count).
    """

    def __init__(self, config: BackboneConfig | dict[str, Any] | None = None) -> None:
        super().__init__()
        self.config = config = as_backbone_config(config)
        self.path = resolve_backbone_path(config.path)  # a .gguf file: its dequantised directory
        check_model_directory(self.path)
        self.processor = load_processor(self.path)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        model = load_base_model(config, self.path)
        self.model = apply_lora(model, config.lora) if config.lora is not None else model
        disable_bnb_cpu_repacking(self.model)
        self._text_config = self._base().config.get_text_config(decoder=True)
        self.value_head = (
            ValueHead(self._text_config.hidden_size, config.value_head_hidden) if config.value_head else None
        )
        if self.value_head is not None and (self.path / VALUE_HEAD_FILE).exists():
            self.value_head.load(self.path)  # a directory exported from a PPO run carries its value head
        self.num_parameters = logical_num_parameters(str(self.path))
        self.eos_ids = eos_token_ids(self._base(), self.tokenizer)
        self.encoder = ChatEncoder(self.processor, self.eos_ids)
        self.suppressed_ids = suppressed_token_ids(self._base(), self.tokenizer, self.eos_ids)
        mask = torch.zeros(self._base().get_output_embeddings().out_features, dtype=torch.bool)
        mask[self.suppressed_ids] = True
        self.register_buffer("_suppressed_mask", mask, persistent=False)  # moves with the module, not saved
        forward_args = inspect.signature(self._base().forward).parameters
        self._accepts_position_ids = "position_ids" in forward_args
        self._accepts_logits_to_keep = "logits_to_keep" in forward_args
        self._final_hidden = FinalHiddenStates(self._base().get_output_embeddings())
        self.cap_counts = {"answers": 0, "at_cap": 0}  # generated answers, and those that hit max_new_tokens
        self._reference_holder: list[nn.Module] = []  # a list: a frozen copy must not become a submodule
        self.tokens_per_image: int | None = None  # FLOPs accounting: None = an image's real tokens
        if config.reference == "eager":
            self.prepare_reference()
        self.train()  # from_pretrained returns eval-mode models; start like any nn.Module (Lightning warns otherwise)

    # -- set-up helpers ---------------------------------------------------------------------------------
    def _base(self) -> nn.Module:
        """The transformers model (inside the peft wrapper under LoRA)."""
        return self.model.get_base_model() if self.config.lora is not None else self.model

    @property
    def base_model(self) -> nn.Module:
        return self._base()

    def _eval_mode(self) -> contextlib.AbstractContextManager:
        return eval_mode(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    @staticmethod
    def _groups(prompts: Sequence[Prompt]) -> list[list[int]]:
        """Indices of image prompts and of text-only prompts: each group is one model batch."""
        groups: dict[bool, list[int]] = {}
        for i, (_, image) in enumerate(prompts):
            groups.setdefault(image is not None, []).append(i)
        return list(groups.values())

    # -- forward pieces -------------------------------------------------------------------------------------
    def forward(self, **inputs: torch.Tensor) -> Any:
        return self.model(**inputs)

    def _with_position_ids(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Position ids exactly as ``generate`` derives them (left padding shifts them), using the model's own rule."""
        if "position_ids" in inputs or not self._accepts_position_ids:
            return inputs
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        position_ids = base._prepare_position_ids_for_generation(inputs["input_ids"], dict(inputs))
        return {**inputs, "position_ids": position_ids}

    def _forward(self, model: nn.Module, inputs: dict[str, torch.Tensor], keep: int, capture: bool = False, cache=None):
        """Logits (and final hidden states) of the last ``keep`` positions; with a ``cache`` holding the first
        columns of ``inputs`` (see :meth:`_model_inputs`), only the columns after them are run."""
        inputs = self._with_position_ids(model, self._to_device(inputs))
        kwargs: dict[str, Any] = {"use_cache": False}
        if cache is not None and (past := cache.get_seq_length()):
            cut = set(per_token_keys(inputs)) - {"attention_mask"}  # the mask keeps the cached columns
            inputs = {key: value[:, past:] if key in cut else value for key, value in inputs.items()}
            kwargs = {"cache": cache, "use_cache": True}
        if self._accepts_logits_to_keep:
            kwargs["logits_to_keep"] = keep  # skip the output layer on prompt positions: big vocabularies
        with self._final_hidden.capture(capture) as store:
            logits = model(**inputs, **kwargs).logits[:, -keep:]
        hidden = store[-1][:, -keep:] if capture else None
        return logits, hidden

    def log_probs(self, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """fp32 log-probs of ``logits`` under this module's convention (``logits / T``, suppressed tokens removed)."""
        return masked_log_probs(logits, temperature, self._suppressed_mask)

    # -- generation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self, prompts: Sequence[Prompt], sampling: SamplingConfig | None = None,
        caches: Sequence[ConversationCache | None] | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[Generation]:
        """Sample one answer per prompt, batched with left padding. Returned tensors are on the CPU.

        ``caches``: to continue conversations, each prompt's cache from its previous turn (None for a new one).
        Text prompts then prefill only what the caches do not hold, and each :class:`Generation` carries its
        conversation's new cache (unless ``config.cache_conversations`` is off).
        ``seeds``: one per prompt; each row then samples from its own generator (:class:`SeededSampler`), so its
        answer does not depend on the rest of the batch. Without seeds, sampling draws from torch's global RNG.
        """
        sampling = sampling or SamplingConfig()
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        results: list[Generation | None] = [None] * len(prompts)
        for group in self._groups(prompts):
            group_caches = None if caches is None else [caches[i] for i in group]
            group_seeds = None if seeds is None else [seeds[i] for i in group]
            generations = self._generate_group([prompts[i] for i in group], sampling, group_caches, group_seeds)
            for i, generation in zip(group, generations):
                results[i] = generation
        return results  # type: ignore[return-value]

    def _generate_group(self, prompts: Sequence[Prompt], sampling: SamplingConfig, caches, seeds) -> list[Generation]:
        from transformers import LogitsProcessorList

        inputs, cache, keep_caches = self._model_inputs(prompts, caches, sampling.max_new_tokens)
        seeded = seeds is not None and sampling.temperature > 0
        config = generation_config(sampling, self.tokenizer, self.eos_ids, self.suppressed_ids, seeded=seeded)
        recorder = LogprobRecorder(sampling.temperature, self._suppressed_mask)
        processors = [recorder, SeededSampler(seeds, sampling.temperature, sampling.top_p)] if seeded else [recorder]
        capture = self.value_head is not None
        with (
            self._eval_mode(),
            only_generation_config(self._base(), config),
            self._final_hidden.capture(capture) as store,
        ):
            sequences = self.model.generate(
                **inputs, **({"cache": cache} if cache is not None else {}),
                generation_config=config, logits_processor=LogitsProcessorList(processors),
            )
        token_logprobs = recorder.finish(sequences)
        new_tokens = sequences[:, inputs["input_ids"].shape[1] :]
        values = self.value_head(store[0][:, -1]).tolist() if capture else [None] * len(prompts)
        prompt_tokens = self.token_counts(inputs).tolist()
        lengths = [answer_length(row, self.eos_ids) for row in new_tokens]
        # Answers cut off by max_new_tokens cannot parse: evaluation reports how many (PolicyModule).
        self.cap_counts["answers"] += len(lengths)
        self.cap_counts["at_cap"] += sum(length >= sampling.max_new_tokens for length in lengths)
        next_caches = None
        if keep_caches:
            images, layers = [image for _, image in prompts], text_layers(self._text_config)
            next_caches = split_rows(cache, sequences, inputs["attention_mask"], lengths, images, layers)
        results = []
        for row, length in enumerate(lengths):
            answer = new_tokens[row, :length].cpu()
            results.append(
                Generation(
                    prompt_ids=inputs["input_ids"][row][inputs["attention_mask"][row].bool()].cpu(),
                    answer_ids=answer,
                    text=self.tokenizer.decode(answer, skip_special_tokens=True),
                    logprobs=token_logprobs[row, :length].cpu(),
                    value=values[row],
                    num_tokens=int(prompt_tokens[row]) + length,
                    cache=next_caches[row] if next_caches else None,
                )
            )
        return results

    def _model_inputs(self, prompts: Sequence[Prompt], caches, new_tokens: int):
        """Encoded prompts, the cache to run them with (None: transformers' own) and whether to hand out
        conversation caches afterwards. Given ``caches``, the cache holds each conversation's reusable prefix and
        the inputs are laid out to continue from it; positions then follow the mask, so the model must take
        position ids."""
        inputs = self._to_device(self.encoder.encode_prompts(prompts))
        images = [image for _, image in prompts]
        cache = new_cache(self._text_config, inputs["input_ids"].shape[1] + new_tokens, images[0] is not None)
        keep = (
            cache is not None and caches is not None and self.config.cache_conversations and self._accepts_position_ids
        )
        if keep:
            inputs = continue_batch(cache, caches, inputs, images, self.tokenizer.pad_token_id)
            # Given, not left to generate: it derives them only if the forward it sees names position_ids.
            inputs = self._with_position_ids(self.model, inputs)
        return inputs, cache, keep

    # -- scoring ---------------------------------------------------------------------------------------------
    def score(
        self,
        prompts: Sequence[Prompt],
        answer_ids: Sequence[torch.Tensor],
        temperature: float = 1.0,
        reference: bool = False,
    ) -> Scores:
        """Log-probs, entropy and values of given answers, batched, with gradients (none for the reference)."""
        if len(prompts) != len(answer_ids):
            raise ValueError(f"{len(prompts)} prompts but {len(answer_ids)} answers")
        token_logprobs: list[torch.Tensor | None] = [None] * len(prompts)
        entropies: list[torch.Tensor | None] = [None] * len(prompts)
        values: list[torch.Tensor | None] = [None] * len(prompts)
        num_tokens = 0
        for group in self._groups(prompts):
            lp, ent, val, n = self._score_group(
                [prompts[i] for i in group], [answer_ids[i] for i in group], temperature, reference
            )
            num_tokens += n
            for j, i in enumerate(group):
                token_logprobs[i], entropies[i] = lp[j], ent[j]
                values[i] = val[j] if val is not None else None
        has_values = self.value_head is not None and not reference
        return Scores(
            logprob_sum=torch.stack([lp.sum() for lp in token_logprobs]),
            token_logprobs=token_logprobs,  # type: ignore[arg-type]
            entropy=torch.stack(entropies),  # type: ignore[arg-type]
            values=torch.stack(values) if has_values else None,  # type: ignore[arg-type]
            num_tokens=num_tokens,
        )

    def _score_group(self, prompts, answers, temperature: float, reference: bool):
        answers = [torch.as_tensor(a).reshape(-1).long().tolist() for a in answers]
        inputs = self.encoder.encode_prompts(prompts)
        batch = self.encoder.append(inputs, answers)
        width = max(len(a) for a in answers)
        keep = width + 1  # the last prompt position predicts the first answer token; it also carries the value
        capture = self.value_head is not None and not reference
        if reference:
            with self._reference_context() as model:
                logits, hidden = self._forward(model, batch, keep)
        else:
            checkpointing = self.config.gradient_checkpointing
            with checkpointing_in_eval_mode(self.model) if checkpointing else contextlib.nullcontext():
                logits, hidden = self._forward(self.model, batch, keep, capture=capture)
        targets = batch["input_ids"][:, batch["input_ids"].shape[1] - width :].to(logits.device)
        # never the whole batch's log-softmax at once: it was the peak of a PPO update's memory
        chosen, entropy = sampled_log_probs(logits[:, :-1], targets, temperature, self._suppressed_mask)
        starts = [width - len(a) for a in answers]  # packed layout: each answer ends in the last column
        token_lp = [chosen[row, start:] for row, start in enumerate(starts)]
        mean_entropy = [entropy[row, start:].sum() / max(width - start, 1) for row, start in enumerate(starts)]
        # the value is read where the prompt ends (the position that predicts the answer's first token)
        values = self.value_head(hidden[torch.arange(len(starts)), starts]) if capture else None
        return token_lp, mean_entropy, values, self.count_tokens(batch)

    @torch.no_grad()
    def prompt_values(
        self, prompts: Sequence[Prompt], caches: Sequence[ConversationCache | None] | None = None
    ) -> torch.Tensor:
        """[B] fp32 values of prompts without generating (e.g. to bootstrap from a truncated state); ``caches``
        as in :meth:`generate` spare re-encoding what a conversation's cache holds."""
        if self.value_head is None:
            raise RuntimeError("prompt_values needs a value head (BackboneConfig.value_head)")
        values = torch.zeros(len(prompts))
        for group in self._groups(prompts):
            group_caches = None if caches is None else [caches[i] for i in group]
            inputs, cache, _ = self._model_inputs([prompts[i] for i in group], group_caches, new_tokens=0)
            with self._eval_mode():
                _, hidden = self._forward(self.model, inputs, keep=1, capture=True, cache=cache)
            values[group] = self.value_head(hidden[:, -1]).float().cpu()  # bf16 under autocast
        return values

    # -- reference policy --------------------------------------------------------------------------------------
    def prepare_reference(self) -> None:
        """Make the reference available now (under full fine-tuning: load the frozen copy from ``config.path``)."""
        if self.config.reference == "none":
            raise RuntimeError("reference log-probs requested but BackboneConfig.reference is 'none'")
        if self.config.lora is None and not self._reference_holder:
            self._reference_holder.append(load_plain_model(self.path, self.config.dtype).to(self.device))

    def anchor_reference(self) -> None:
        """The reference becomes a frozen copy of the weights now (before a resume restores trained ones): under
        (Q)LoRA a second adapter over the shared base weights, under full fine-tuning a copy of the model."""
        if self.config.lora is not None:
            add_frozen_adapter_copy(self.model)
        else:
            self._reference_holder[:] = [copy.deepcopy(self.model).eval().requires_grad_(False)]

    @property
    def frozen_reference(self) -> nn.Module | None:
        """The frozen copy that is the KL reference under full fine-tuning, once made (None under (Q)LoRA)."""
        return self._reference_holder[0] if self._reference_holder else None

    @property
    def reference_weights(self) -> nn.Module:
        """The module whose weights the reference log-probs read: the frozen copy, or (LoRA) this backbone."""
        self.prepare_reference()
        return self if self.frozen_reference is None else self.frozen_reference

    @contextlib.contextmanager
    def _reference_context(self) -> Iterator[nn.Module]:
        self.prepare_reference()
        with torch.no_grad():
            if self._reference_holder:
                yield self._reference_holder[0].to(self.device)  # no copy when already there
            else:  # LoRA: the anchored adapter, or the base weights (the adapter disabled)
                with lora_reference(self.model):
                    yield self.model

    # -- SFT ---------------------------------------------------------------------------------------------------
    def sft_batch(
        self, conversations: Sequence[Prompt], all_turns: Sequence[bool] | None = None
    ) -> dict[str, torch.Tensor]:
        """Model inputs + ``labels`` for conversations ending with an assistant turn (CPU tensors): the first
        prompt and the rest, packed (``ChatEncoder.append``); labels IGNORE except the final assistant turn through
        its end-of-turn token (earlier turns are context: ``ChatEncoder.sft_row``), or every assistant turn of the
        conversations whose ``all_turns`` flag is set. A batch's conversations all have an image, or none."""
        flags = list(all_turns) if all_turns is not None else [False] * len(conversations)
        rows = [self.encoder.sft_row(conversation, flag)
                for conversation, flag in zip(conversations, flags, strict=True)]
        prompts = self.encoder.encode_prompts([row.prompt for row in rows])
        batch = self.encoder.append(prompts, [row.ids for row in rows])
        batch["labels"] = sft_labels(rows, batch)
        return batch

    def label_logits(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """For an :meth:`sft_batch`: the logits that predict each position from the first labelled one on, those
        positions' labels (IGNORE where unlabelled) and the tokens processed (text + image). The output layer runs
        only on the labelled span."""
        labels = batch["labels"].to(self.device)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        columns = (labels != IGNORE).any(dim=0).nonzero()
        if columns.numel() == 0:
            raise ValueError("the batch has no labelled token")
        first = int(columns[0, 0])
        logits, _ = self._forward(self.model, inputs, keep=labels.shape[1] - first + 1)
        return logits[:, :-1], labels[:, first:], self.count_tokens(inputs)

    def count_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens a model-input batch makes the model process, for FLOPs accounting (see :meth:`token_counts`)."""
        return int(self.token_counts(batch).sum())

    def token_counts(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per row, the tokens processed (:func:`lit_sftrl.core.compute.token_counts`), with this model's tile size."""
        vision = self._base().config.vision_config if "cross_attention_mask" in batch else None  # Mllama's tiles
        tile = None if vision is None else (vision.image_size // vision.patch_size) ** 2 + 1  # + class token
        return token_counts(batch, tile_tokens=tile, tokens_per_image=self.tokens_per_image)

    # -- state -------------------------------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable parameters by module name: LoRA + value head under (Q)LoRA, everything trainable under full
        fine-tuning. With ``config.path`` this is all a checkpoint needs."""
        return {name: param.detach() for name, param in self.named_parameters() if param.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True, value_head: bool = True):
        """Load what :meth:`trainable_state_dict` produced; ``value_head=False`` keeps the value head (PPO from SFT)."""
        load_trainable(self, state, strict=strict, value_head=value_head)
