"""The backbone wrapper, for every family the project builds: images matter, log-probs agree between generation
and scoring, LoRA/QLoRA/int8 work, the reference is the base model, SFT labels are exact, export round-trips."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_sftrl.models import Backbone, BackboneConfig, LoraSettings, SamplingConfig
from lit_sftrl.models.encoding import per_token_keys
from lit_sftrl.models.export import (
    export_checkpoint,
    load_backbone_from_lightning_checkpoint,
    load_weights_for_init,
    save_backbone,
)
from lit_sftrl.training.micro_batches import padding
from lit_sftrl.training.sft import sft_loss

LORA = LoraSettings(r=4, alpha=8, dropout=0.0)


def make(path: Path, **options) -> Backbone:
    return Backbone(BackboneConfig(path=str(path), **options)).eval()


def prompts_of(chats, images, with_images: bool = True):
    return [(chat, image if with_images else None) for chat, image in zip(chats, images)]


def prompt_logits(model, backbone: Backbone, prompts) -> torch.Tensor:
    """Full logits of a plain transformers model (or the backbone's) on the backbone's encoding of prompts."""
    inputs = backbone.encoder.encode_prompts(prompts)
    with torch.no_grad():
        return model(**inputs).logits


def sft_conversations(chats, images):
    answers = ['{"formula": "1 + 2"}', "turn_direction(north)", "24", "ok"]
    return [(chat + [{"role": "assistant", "content": a}], image) for chat, a, image in zip(chats, answers, images)]


def train_step(backbone: Backbone, conversations, lr: float = 1e-2) -> None:
    optimizer = torch.optim.Adam([p for p in backbone.parameters() if p.requires_grad], lr=lr)
    logits, labels, _ = backbone.label_logits(backbone.sft_batch(conversations))
    loss = sft_loss(logits, labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def randomize_value_head(backbone: Backbone) -> None:
    """The value head's output layer starts at zero; give it weights so value comparisons mean something."""
    torch.nn.init.normal_(backbone.value_head.net[-1].weight, std=0.5)


def lightning_checkpoint(backbone: Backbone, path: Path, config_as_dict: bool = False) -> Path:
    """What the SFT/PPO LightningModules write (the checkpoint contract of lit_sftrl.models.export)."""
    config = dataclasses.asdict(backbone.config) if config_as_dict else backbone.config
    state = {f"backbone.{k}": v.clone() for k, v in backbone.trainable_state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"backbone": config}, "epoch": 0}, path)
    return path


# -- images, loading, errors ----------------------------------------------------------------------------------
def test_image_changes_logits(tiny_dir, chats, images):
    backbone = make(tiny_dir)
    first = prompt_logits(backbone.model, backbone, [(chats[1], images[0])])
    second = prompt_logits(backbone.model, backbone, [(chats[1], images[1])])
    assert (first[0, -1] - second[0, -1]).abs().max() > 1e-3


def test_save_load_round_trip_gives_identical_logits(tiny_dir, chats, images, tmp_path):
    from transformers import AutoModelForImageTextToText

    backbone = make(tiny_dir, value_head=True)
    randomize_value_head(backbone)
    train_step(backbone.train(), sft_conversations(chats, images))
    save_backbone(backbone.eval(), tmp_path / "out")
    prompts = prompts_of(chats, images)
    expected = prompt_logits(backbone.model, backbone, prompts)
    plain = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()
    assert torch.equal(prompt_logits(plain, backbone, prompts), expected)
    reloaded = make(tmp_path / "out", value_head=True)  # the value head comes back from value_head.safetensors
    assert torch.equal(prompt_logits(reloaded.model, reloaded, prompts), expected)
    assert torch.equal(reloaded.value_head.net[-1].weight, backbone.value_head.net[-1].weight)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        Backbone(BackboneConfig(path=str(tmp_path / "no-such-model")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        Backbone(BackboneConfig(path=str(tmp_path / "empty")))


def test_config_reads_from_yaml():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--backbone", type=BackboneConfig)
    yaml = "backbone:\n  path: x\n  quantization: nf4\n  lora:\n    r: 8\n    target_modules: [q_proj]\n"
    config = parser.instantiate_classes(parser.parse_string(yaml)).backbone
    assert config == BackboneConfig(path="x", quantization="nf4", lora=LoraSettings(r=8, target_modules=["q_proj"]))


def test_text_only_causal_lm(tiny_dir_factory, tmp_path):
    """L tasks may use a plain causal LM: AutoModelForCausalLM and a bare tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir_factory("mllama"))
    text = dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=128
    )
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(
        LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **text, **ids)
    ).save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    backbone = make(tmp_path / "lm", lora=LORA, value_head=True)
    assert backbone.encoder.multimodal is False
    prompts = [([{"role": "user", "content": "Cards: A, 5."}], None), ([{"role": "user", "content": "24?"}], None)]
    generations = backbone.generate(prompts, SamplingConfig(temperature=0.5, max_new_tokens=6))
    scores = backbone.score(prompts, [g.answer_ids for g in generations], temperature=0.5)
    for generation, token_logprobs in zip(generations, scores.token_logprobs):
        assert (generation.logprobs - token_logprobs.detach()).abs().max() < 1e-4
    with pytest.raises(ValueError, match="text-only"):
        backbone.generate([(prompts[0][0], np.zeros((8, 8, 3), np.uint8))], SamplingConfig(max_new_tokens=2))


def test_bfloat16_backbone_generates_and_trains(tiny_dir_factory, chats, images):
    backbone = make(tiny_dir_factory("mllama"), dtype="bfloat16", lora=LORA, value_head=True)
    assert next(backbone.model.parameters()).dtype == torch.bfloat16
    prompts = prompts_of(chats[:2], images[:2])
    generations = backbone.generate(prompts, SamplingConfig(temperature=1.0, max_new_tokens=4))
    scores = backbone.score(prompts, [g.answer_ids for g in generations])
    assert scores.logprob_sum.dtype == torch.float32 and scores.values.dtype == torch.float32
    for generation, token_logprobs in zip(generations, scores.token_logprobs):
        assert (generation.logprobs - token_logprobs.detach()).abs().max() < 0.1  # bf16: loose, but the same tokens
    (scores.logprob_sum.sum() + scores.values.sum()).backward()


def test_bad_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        load_backbone_from_lightning_checkpoint(tmp_path / "missing.ckpt")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="garbage.ckpt"):
        export_checkpoint(garbage, tmp_path / "out")
    torch.save({"state_dict": {}, "hyper_parameters": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(ValueError, match="foreign.ckpt"):
        load_backbone_from_lightning_checkpoint(tmp_path / "foreign.ckpt")


def test_truncated_checkpoint_is_a_clear_error(tiny_dir_factory, tmp_path):
    backbone = make(tiny_dir_factory("mllama"), lora=LORA)
    data = lightning_checkpoint(backbone, tmp_path / "full.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.ckpt"):
        load_backbone_from_lightning_checkpoint(tmp_path / "cut.ckpt")


# -- generation and scoring ------------------------------------------------------------------------------------
def test_batched_greedy_equals_one_at_a_time(tiny_dir, chats, images):
    backbone = make(tiny_dir)
    prompts = prompts_of(chats, images)
    greedy = SamplingConfig(temperature=0, max_new_tokens=10)
    batched = backbone.generate(prompts, greedy)
    for prompt, together in zip(prompts, batched):
        (alone,) = backbone.generate([prompt], greedy)
        assert torch.equal(alone.answer_ids, together.answer_ids)
        assert torch.equal(alone.prompt_ids, together.prompt_ids)
        torch.testing.assert_close(alone.logprobs, together.logprobs, atol=1e-4, rtol=0)


def test_generation_and_scoring_log_probs_agree(tiny_dir, chats, images):
    backbone = make(tiny_dir, value_head=True)
    randomize_value_head(backbone)
    prompts = prompts_of(chats, images)
    torch.manual_seed(0)
    generations = backbone.generate(prompts, SamplingConfig(temperature=0.7, top_p=0.9, max_new_tokens=12))
    assert len({len(g.answer_ids) for g in generations} | {len(g.prompt_ids) for g in generations}) > 1
    scores = backbone.score(prompts, [g.answer_ids for g in generations], temperature=0.7)
    for generation, token_logprobs in zip(generations, scores.token_logprobs):
        assert generation.logprobs.dtype == torch.float32
        assert (generation.logprobs - token_logprobs.detach()).abs().max() < 1e-4
        assert generation.text == backbone.tokenizer.decode(generation.answer_ids, skip_special_tokens=True)
    torch.testing.assert_close(scores.values.detach(), torch.tensor([g.value for g in generations]), atol=1e-4, rtol=0)
    sums = torch.stack([g.logprobs.sum() for g in generations])
    torch.testing.assert_close(scores.logprob_sum.detach(), sums, atol=1e-3, rtol=0)
    assert scores.logprob_sum.requires_grad and scores.entropy.requires_grad and (scores.entropy > 0).all()
    torch.testing.assert_close(backbone.prompt_values(prompts), scores.values.detach(), atol=1e-4, rtol=0)
    # FLOPs accounting: text + answer tokens, plus Mllama's cross-attended vision tokens (1 tile of 7x7+1 patches)
    vision = len(prompts) * 50 if backbone.model.config.model_type == "mllama" else 0
    text = sum(len(g.prompt_ids) + len(g.answer_ids) for g in generations)
    assert scores.num_tokens == sum(g.num_tokens for g in generations) == text + vision


def test_scoring_batches_are_packed_and_padding_is_counted_as_laid_out(tiny_dir, chats, images):
    """Each row ends in the last column, so a scoring batch is as wide as its longest prompt + answer (not the
    longest prompt plus the longest answer), and PPO's padding meter counts exactly that layout's padded slots."""
    backbone = make(tiny_dir)
    for prompts in (prompts_of(chats, images), prompts_of(chats, images, with_images=False)):
        answers = [[5] * n for n in (12, 1, 7, 3)]
        prompt_mask = backbone.encoder.encode_prompts(prompts)["attention_mask"]
        batch = backbone.encoder.append(backbone.encoder.encode_prompts(prompts), answers)
        mask = batch["attention_mask"]
        lengths = [(int(m.sum()), len(a)) for m, a in zip(prompt_mask, answers)]
        assert mask.shape[1] == max(p + a for p, a in lengths) < prompt_mask.shape[1] + 12
        for row, (p, a) in enumerate(lengths):
            assert batch["input_ids"][row, -a:].tolist() == answers[row]
            assert mask[row, -(p + a) :].all() and int(mask[row].sum()) == p + a
        assert all(value.shape[1] == mask.shape[1] for key, value in batch.items() if key in per_token_keys(batch))
        assert padding([list(range(len(lengths)))], lengths) == (int((mask == 0).sum()), mask.numel())


def test_special_and_image_tokens_are_never_sampled(tiny_dir, chats, images):
    backbone = make(tiny_dir)
    image_token = backbone.model.config.image_token_id
    assert image_token in backbone.suppressed_ids and backbone.tokenizer.pad_token_id in backbone.suppressed_ids
    assert backbone.tokenizer.eos_token_id not in backbone.suppressed_ids
    torch.manual_seed(1)
    generations = backbone.generate(prompts_of(chats, images), SamplingConfig(temperature=5.0, max_new_tokens=24))
    sampled = torch.cat([g.answer_ids for g in generations])
    assert not torch.isin(sampled, torch.tensor(backbone.suppressed_ids)).any()


def test_text_only_prompts_and_mixed_batches(tiny_dir, chats, images):
    backbone = make(tiny_dir, value_head=True)
    mixed = [(chats[0], images[0]), (chats[1], None), (chats[2], images[2]), (chats[3], None)]
    greedy = SamplingConfig(temperature=0, max_new_tokens=6)
    generations = backbone.generate(mixed, greedy)
    for prompt, generation in zip(mixed, generations):
        assert torch.equal(backbone.generate([prompt], greedy)[0].answer_ids, generation.answer_ids)
    scores = backbone.score(mixed, [g.answer_ids for g in generations])
    for generation, token_logprobs in zip(generations, scores.token_logprobs):
        assert (generation.logprobs - token_logprobs.detach()).abs().max() < 1e-4
    assert scores.values.shape == (4,)


# -- SFT ---------------------------------------------------------------------------------------------------------
def test_sft_labels_are_exactly_the_final_assistant_turn(tiny_dir, images):
    """Earlier assistant turns (a revision conversation's wrong answers) are context, not trained on."""
    backbone = make(tiny_dir)
    eot = backbone.tokenizer.eos_token
    conversations = [
        (
            [
                {"role": "user", "content": "Cards: A, 5, 10, K."},
                {"role": "assistant", "content": '{"formula": "1 + 5"}'},
                {"role": "user", "content": "You failed this trial because it is 6."},
                {"role": "assistant", "content": '{"formula": "(10 - 5) * 1 + 10"}'},
            ],
            images[0],
        ),
        ([{"role": "user", "content": "short"}, {"role": "assistant", "content": "24"}], images[1]),
    ]
    batch = backbone.sft_batch(conversations)
    expected = [['{"formula": "(10 - 5) * 1 + 10"}' + eot], ["24" + eot]]
    for row, spans in enumerate(expected):
        labels = batch["labels"][row]
        labelled = labels != -100
        assert torch.equal(labels[labelled], batch["input_ids"][row][labelled])
        assert (batch["attention_mask"][row][labelled] == 1).all()
        # contiguous labelled spans, decoded with special tokens kept
        edges = torch.diff(labelled.int(), prepend=torch.tensor([0]), append=torch.tensor([0]))
        starts, ends = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten()
        decoded = [backbone.tokenizer.decode(labels[s:e]) for s, e in zip(starts, ends)]
        assert decoded == spans
    logits, labels, tokens = backbone.label_logits(batch)
    loss = sft_loss(logits, labels)
    assert loss.requires_grad and loss.item() > 0 and tokens >= int(batch["attention_mask"].sum())


def test_multi_turn_sft_ablation_trains_on_the_final_correct_answer_only(tiny_dir):
    """The paper's App. C.1 ablation (data.multi_turn): wrong answer and feedback sit in the prompt."""
    from lit_sftrl.data.datamodules import expert_conversations
    from lit_sftrl.envs.general_points import GeneralPointsEnv

    backbone = make(tiny_dir)
    conversations = expert_conversations(GeneralPointsEnv(), 3, {}, np.random.default_rng(0), multi_turn=1.0)
    [conversation] = conversations
    roles = [m["role"] for m in conversation["messages"]]
    assert roles == ["user", "assistant", "user", "assistant"]  # wrong answer, feedback, correction
    batch = backbone.sft_batch([(conversation["messages"], None)])
    labels = batch["labels"][0]
    decoded = backbone.tokenizer.decode(labels[labels != -100])
    assert decoded == conversation["messages"][-1]["content"] + backbone.tokenizer.eos_token
    assert conversation["messages"][1]["content"] != conversation["messages"][-1]["content"]


def test_gradient_checkpointing_gives_the_same_loss(tiny_dir, chats, images):
    batch_of = sft_conversations(chats, images)
    plain = make(tiny_dir, lora=LORA).train()
    checkpointed = make(tiny_dir, lora=LORA, gradient_checkpointing=True).train()
    checkpointed.load_trainable_state_dict(plain.trainable_state_dict())
    loss = sft_loss(*plain.label_logits(plain.sft_batch(batch_of))[:2])
    loss_ckpt = sft_loss(*checkpointed.label_logits(checkpointed.sft_batch(batch_of))[:2])
    loss_ckpt.backward()
    torch.testing.assert_close(loss, loss_ckpt)
    assert all(p.grad is not None for p in checkpointed.parameters() if p.requires_grad)



def saved_activation_bytes(backbone: Backbone, prompts, answers) -> tuple[int, torch.Tensor]:
    """Bytes the autograd graph of one scoring forward keeps for the backward (each storage once), and its
    log-probs."""
    storages: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        scores = backbone.score(prompts, answers)
    return sum(storages.values()), scores.logprob_sum


def test_gradient_checkpointing_holds_in_the_eval_mode_ppo_scores_in(tiny_dir, chats, images):
    # PPO scores in eval mode (no dropout), where transformers skips checkpointing: it once silently kept every
    # activation, doubling a GRPO update's memory on the bench's tiny model.
    plain = make(tiny_dir)
    checkpointed = make(tiny_dir, gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    prompts = prompts_of(chats, images)
    answers = [g.answer_ids for g in plain.generate(prompts, SamplingConfig(temperature=1.0, max_new_tokens=8))]
    kept, logprobs = saved_activation_bytes(plain, prompts, answers)
    kept_checkpointed, logprobs_checkpointed = saved_activation_bytes(checkpointed, prompts, answers)
    assert not checkpointed.training and kept_checkpointed < 0.6 * kept
    torch.testing.assert_close(logprobs_checkpointed, logprobs)
    logprobs.sum().backward()
    logprobs_checkpointed.sum().backward()  # recomputes the layers: the same gradients
    grads = {name: p.grad for name, p in plain.named_parameters() if p.grad is not None}
    grads_checkpointed = {name: p.grad for name, p in checkpointed.named_parameters() if p.grad is not None}
    assert grads and grads.keys() == grads_checkpointed.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_checkpointed[name], grad, msg=name)
    assert not any(m.training for m in checkpointed.modules())  # the layers flagged training are unflagged

# -- LoRA, reference, quantisation -------------------------------------------------------------------------------
def test_under_lora_only_adapter_and_value_head_get_gradients(tiny_dir, chats, images):
    backbone = make(tiny_dir, lora=LORA, value_head=True).train()
    adapted = {n for n, m in backbone.model.named_modules() if hasattr(m, "lora_A")}
    assert adapted and all("language_model" in name for name in adapted)  # never the vision tower
    prompts = prompts_of(chats, images)
    generations = backbone.generate(prompts, SamplingConfig(temperature=1.0, max_new_tokens=5))
    scores = backbone.score(prompts, [g.answer_ids for g in generations])
    (scores.logprob_sum.sum() + scores.values.sum() + scores.entropy.sum()).backward()
    for name, param in backbone.named_parameters():
        trainable = ".lora_" in name or name.startswith("value_head.")
        assert param.requires_grad == trainable, name
        assert (param.grad is not None) == trainable, name
    assert set(backbone.trainable_state_dict()) == {n for n, p in backbone.named_parameters() if p.requires_grad}


def _answer_scores(backbone, prompts, answers, reference=False):
    with torch.no_grad():
        return backbone.score(prompts, answers, reference=reference).logprob_sum


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_reference_is_the_base_model_and_stays_put(tiny_dir, chats, images, lora):
    prompts = prompts_of(chats, images)
    base = make(tiny_dir)
    answers = [g.answer_ids for g in base.generate(prompts, SamplingConfig(temperature=1.0, max_new_tokens=6))]
    expected = _answer_scores(base, prompts, answers)
    backbone = make(tiny_dir, lora=LORA if lora else None)
    torch.nn.init.normal_(next(p for n, p in backbone.named_parameters() if "lora_B" in n or not lora), std=0.05)
    torch.testing.assert_close(_answer_scores(backbone, prompts, answers, reference=True), expected, atol=1e-5, rtol=0)
    train_step(backbone.train(), sft_conversations(chats, images))
    backbone.eval()
    assert (_answer_scores(backbone, prompts, answers) - expected).abs().max() > 1e-3
    torch.testing.assert_close(_answer_scores(backbone, prompts, answers, reference=True), expected, atol=1e-5, rtol=0)
    reference_params = {id(p) for m in backbone._reference_holder for p in m.parameters()}
    assert not reference_params & {id(p) for p in backbone.parameters()}  # no copy leaks into the optimiser
    assert all(not k.startswith("_reference") for k in backbone.state_dict())


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_lora_anchor_is_a_frozen_adapter_not_a_copy_of_the_model(tiny_dir, chats, images, quantization, tmp_path):
    # PPO from a LoRA SFT run anchors its KL at that run: a second adapter over the shared (possibly 4-bit) base.
    prompts = prompts_of(chats, images)
    backbone = make(tiny_dir, lora=dataclasses.replace(LORA, dropout=0.5), quantization=quantization)
    with torch.no_grad():  # an adapter that moved away from the base (an SFT run's)
        for name, param in backbone.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    answers = [g.answer_ids for g in backbone.generate(prompts, SamplingConfig(temperature=1.0, max_new_tokens=6))]
    anchored = _answer_scores(backbone, prompts, answers)
    assert (anchored - _answer_scores(backbone, prompts, answers, reference=True)).abs().max() > 1e-3  # not base
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    size = sum(p.numel() for p in backbone.parameters())
    backbone.anchor_reference()
    added = sum(p.numel() for p in backbone.parameters()) - size
    assert added == sum(p.numel() for n, p in backbone.named_parameters() if n in trainable)  # the adapter's size
    assert not backbone._reference_holder
    torch.testing.assert_close(_answer_scores(backbone, prompts, answers, reference=True), anchored, atol=1e-5, rtol=0)
    assert {n for n, p in backbone.named_parameters() if p.requires_grad} == trainable  # switching back restored it
    backbone.train()  # the policy's LoRA dropout (0.5 here) does not reach the reference
    torch.testing.assert_close(_answer_scores(backbone, prompts, answers, reference=True), anchored, atol=1e-5, rtol=0)
    train_step(backbone.train(), sft_conversations(chats, images))
    backbone.eval()
    assert (_answer_scores(backbone, prompts, answers) - anchored).abs().max() > 1e-3  # the policy moved
    torch.testing.assert_close(_answer_scores(backbone, prompts, answers, reference=True), anchored, atol=1e-5, rtol=0)
    assert set(backbone.trainable_state_dict()) == trainable  # checkpoints never hold the reference
    save_backbone(backbone, tmp_path / "adapter", merge_lora=False)  # nor does a saved adapter
    assert not any("reference" in str(path) for path in (tmp_path / "adapter").rglob("*"))


def test_reference_none_refuses(tiny_dir_factory, chats):
    backbone = make(tiny_dir_factory("mllama"), reference="none")
    with pytest.raises(RuntimeError, match="reference"):
        backbone.score([(chats[0], None)], [torch.tensor([5, 6])], reference=True)


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_quantisation_keeps_the_vision_side_and_the_output_layer_in_float(tiny_dir, quantization):
    import bitsandbytes as bnb

    from lit_sftrl.models.loading import is_vision_module

    backbone = make(tiny_dir, lora=LORA, quantization=quantization)
    packed = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    quantised = [name for name, module in backbone.model.named_modules() if isinstance(module, packed)]
    assert any("language_model" in name for name in quantised)  # the decoder's linears are quantised
    vision = [name for name, module in backbone.model.named_modules()
              if isinstance(module, torch.nn.Linear) and is_vision_module(name)]
    assert vision and not [name for name in quantised if is_vision_module(name) or name.endswith("lm_head")]


def test_nf4_qlora_generates_then_trains(tiny_dir, chats, images):
    backbone = make(tiny_dir, lora=LORA, quantization="nf4", value_head=True)
    assert backbone.num_parameters == make(tiny_dir).num_parameters  # logical count, not packed storage
    prompts = prompts_of(chats[:2], images[:2])
    generations = backbone.generate(prompts, SamplingConfig(temperature=1.0, max_new_tokens=4))
    before = {k: v.clone() for k, v in backbone.trainable_state_dict().items()}
    optimizer = torch.optim.Adam([p for p in backbone.parameters() if p.requires_grad], lr=1e-2)
    backbone.train()
    for _ in range(2):  # the second step exercises non-zero LoRA B through the 4-bit layers
        scores = backbone.score(prompts, [g.answer_ids for g in generations])
        (-(scores.logprob_sum.sum()) + scores.values.pow(2).sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    after = backbone.trainable_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)


def test_int8_loads_and_generates(tiny_dir, chats, images):
    backbone = make(tiny_dir, lora=LORA, quantization="int8")
    generations = backbone.generate(prompts_of(chats[:2], images[:2]), SamplingConfig(temperature=0, max_new_tokens=4))
    assert all(len(g.answer_ids) > 0 and torch.isfinite(g.logprobs).all() for g in generations)


def test_quantization_without_lora_is_refused(tiny_dir_factory):
    with pytest.raises(ValueError, match="lora"):
        make(tiny_dir_factory("mllama"), quantization="nf4")


def test_freeze_vision_under_full_fine_tuning(tiny_dir):
    backbone = make(tiny_dir, freeze_vision=True)
    frozen = [n for n, p in backbone.named_parameters() if not p.requires_grad]
    assert frozen and all(("vision" in n) or ("multi_modal_projector" in n) for n in frozen)


# -- checkpoints and export --------------------------------------------------------------------------------------
@pytest.mark.parametrize("merge", [True, False], ids=["merged", "adapter"])
def test_export_loads_in_plain_transformers(tiny_dir, chats, images, tmp_path, merge):
    from transformers import AutoModelForImageTextToText

    backbone = make(tiny_dir, lora=LORA, value_head=True)
    train_step(backbone.train(), sft_conversations(chats, images))
    backbone.eval()
    ckpt = lightning_checkpoint(backbone, tmp_path / "run.ckpt", config_as_dict=not merge)
    out = export_checkpoint(ckpt, tmp_path / "export", merge_lora=merge)
    assert (out / "value_head.safetensors").exists() and ((out / "adapter_config.json").exists() != merge)
    plain = AutoModelForImageTextToText.from_pretrained(out).eval()  # adapter dirs: transformers' peft integration
    prompts = prompts_of(chats, images)
    torch.testing.assert_close(
        prompt_logits(plain, backbone, prompts), prompt_logits(backbone.model, backbone, prompts), atol=1e-5, rtol=0
    )


def test_inherited_flops_follow_checkpoints_and_exports(tiny_dir_factory, tmp_path):
    pytest.importorskip("lit_sftrl.core.compute")
    from lit_sftrl.models.export import inherited_flops

    backbone = make(tiny_dir_factory("llava"), lora=LORA)
    ckpt = lightning_checkpoint(backbone, tmp_path / "run.ckpt")
    counter = {"num_parameters": 10, "initial": 5.0, "train_tokens": 2, "inference_tokens": 3}
    torch.save({**torch.load(ckpt, weights_only=False), "flops": counter}, ckpt)
    assert inherited_flops(ckpt) == 5.0 + 6 * 10 * 2 + 2 * 10 * 3
    assert inherited_flops(export_checkpoint(ckpt, tmp_path / "export")) == inherited_flops(ckpt)
    assert inherited_flops(tiny_dir_factory("llava")) == 0.0


def test_load_weights_for_init_skips_the_value_head(tiny_dir, chats, images, tmp_path):
    sft = make(tiny_dir, lora=LORA, value_head=True)
    train_step(sft.train(), sft_conversations(chats, images))
    randomize_value_head(sft)
    ppo = make(tiny_dir, lora=LORA, value_head=True)
    fresh_head = {k: v.clone() for k, v in ppo.value_head.state_dict().items()}
    load_weights_for_init(ppo, lightning_checkpoint(sft, tmp_path / "sft.ckpt"))
    for name, value in sft.trainable_state_dict().items():
        if name.startswith("value_head."):
            assert torch.equal(
                ppo.value_head.state_dict()[name[len("value_head.") :]], fresh_head[name[len("value_head.") :]]
            )
        else:
            assert torch.equal(ppo.trainable_state_dict()[name], value), name
    # A full fine-tuning run initialised from the merged export reproduces the SFT policy.
    export_checkpoint(tmp_path / "sft.ckpt", tmp_path / "merged")
    full = make(tiny_dir)
    load_weights_for_init(full, tmp_path / "merged")
    prompts = prompts_of(chats, images)
    torch.testing.assert_close(
        prompt_logits(full.model, full, prompts), prompt_logits(sft.eval().model, sft, prompts), atol=1e-5, rtol=0
    )
