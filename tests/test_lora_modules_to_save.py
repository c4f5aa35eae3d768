"""LoRA with ``modules_to_save`` (peft trains full copies of named modules beside the adapter): bad names refused
before training, the copies train while the KL reference keeps the originals, and checkpoints, ``init_from``,
exports and the plan all carry the copies; tied embeddings stay one matrix."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from test_backbone import lightning_checkpoint, make, prompt_logits, prompts_of, sft_conversations, train_step

from lit_sftrl.models import LoraSettings
from lit_sftrl.models.export import export_checkpoint, load_backbone_from_lightning_checkpoint, load_weights_for_init

REPO = Path(__file__).resolve().parents[1]
SAVED = LoraSettings(r=4, alpha=8, dropout=0.0, modules_to_save=["embed_tokens", "lm_head"])
# The tiny Mllama's trained copies, named as inside the backbone (and, prefixed "backbone.", in a checkpoint).
EMBED = "model.base_model.model.model.language_model.embed_tokens"
EMBED_COPY = f"{EMBED}.modules_to_save.default.weight"
HEAD_COPY = "model.base_model.model.lm_head.modules_to_save.default.weight"


@pytest.fixture(scope="module")
def tiny(tiny_dir_factory) -> Path:
    return tiny_dir_factory("mllama")


@pytest.fixture(scope="module")
def tied(tiny_dir_factory, tmp_path_factory) -> Path:
    """A text LM whose input and output embeddings are one matrix (SmolLM2, Gemma3)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir_factory("mllama"))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=128, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True,
    )
    out = tmp_path_factory.mktemp("tied") / "lm"
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def trained(path: Path, chats, images, lora: LoraSettings = SAVED, **options):
    backbone = make(path, lora=lora, **options)
    train_step(backbone.train(), sft_conversations(chats, images), lr=5e-2)
    return backbone.eval()


@pytest.mark.parametrize(("names", "message"), [
    (["embed_tokenz"],
     "this model has no module named 'embed_tokenz'.*'model.language_model.embed_tokens' and 'lm_head'$"),
    (["q_proj"], "'model.language_model.layers.0.self_attn.q_proj' is \\(or holds\\) a layer LoRA adapts"),
    (["layers"], "'model.language_model.layers' is \\(or holds\\) a layer LoRA adapts"),
])
def test_a_name_the_model_cannot_save_is_refused_when_it_loads(tiny, names, message):
    with pytest.raises(ValueError, match=f"^backbone.lora.modules_to_save: {message}"):
        make(tiny, lora=dataclasses.replace(SAVED, modules_to_save=names))


def test_qlora_trains_a_float_saved_module_and_refuses_a_quantised_one(tiny, chats, images):
    backbone = make(tiny, lora=dataclasses.replace(SAVED, modules_to_save=["lm_head"]), quantization="nf4")
    before = dict(backbone.named_parameters())[HEAD_COPY].detach().clone()  # the output layer stays float
    train_step(backbone.train(), sft_conversations(chats, images), lr=5e-2)
    assert not torch.equal(dict(backbone.named_parameters())[HEAD_COPY], before)
    lora = dataclasses.replace(SAVED, target_modules=["q_proj"], modules_to_save=["o_proj"])
    with pytest.raises(ValueError, match=r"^backbone.lora.modules_to_save: 'model\..*o_proj' is quantised"):
        make(tiny, lora=lora, quantization="nf4")


def test_the_command_line_refuses_a_misspelt_name_before_anything_runs(tiny, tmp_path, monkeypatch):
    from lit_sftrl.cli import run
    from lit_sftrl.models import backbone

    monkeypatch.setattr(backbone.Backbone, "__init__", lambda *a, **k: pytest.fail("a model was built"))
    lora = {"r": 4, "modules_to_save": ["lm_head", "embed_tokenz"]}
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", str(REPO / "configs/virl_l_sft.yaml"), "--model.init_args.backbone.path", str(tiny),
             "--model.init_args.backbone.lora", json.dumps(lora), "--trainer.default_root_dir", str(tmp_path / "run")])
    assert "model.backbone.lora.modules_to_save: this model has no module named 'embed_tokenz'" in exit_info.value.code
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("names", [[], [""], "lm_head"])
def test_a_malformed_list_is_refused_by_the_config(names):
    with pytest.raises(ValueError, match="^lora.modules_to_save: must be a non-empty list of module names"):
        LoraSettings(modules_to_save=names)


def test_saved_modules_train_while_the_reference_keeps_the_originals(tiny, chats, images):
    prompts = prompts_of(chats, images)
    base = make(tiny)
    expected = prompt_logits(base.model, base, prompts)
    backbone = make(tiny, lora=SAVED)
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert {n for n in trainable if ".lora_" not in n} == {EMBED_COPY, HEAD_COPY}
    settings = backbone.config.lora.modules_to_save
    train_step(backbone.train(), sft_conversations(chats, images), lr=5e-2)
    backbone.eval()
    assert backbone.config.lora.modules_to_save == settings == ["embed_tokens", "lm_head"]  # peft extends its copy
    state = dict(backbone.named_parameters())
    base_embedding = base.model.model.language_model.embed_tokens.weight
    assert not torch.equal(state[EMBED_COPY], base_embedding)  # the copy trained
    assert torch.equal(state[f"{EMBED}.original_module.weight"], base_embedding)  # the original did not
    assert (prompt_logits(backbone.model, backbone, prompts) - expected).abs().max() > 1e-3
    with backbone._reference_context() as reference:
        torch.testing.assert_close(prompt_logits(reference, backbone, prompts), expected, atol=1e-5, rtol=0)
    assert set(backbone.trainable_state_dict()) == trainable  # checkpoints hold the copies


def test_the_anchored_reference_holds_the_saved_copies_too(tiny, chats, images):
    # PPO initialised from a LoRA SFT run anchors its KL at that run's adapter and saved copies.
    prompts = prompts_of(chats, images)
    backbone = trained(tiny, chats, images)
    anchored = prompt_logits(backbone.model, backbone, prompts)
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    backbone.anchor_reference()
    assert {n for n, p in backbone.named_parameters() if p.requires_grad} == trainable
    train_step(backbone.train(), sft_conversations(chats, images), lr=5e-2)
    backbone.eval()
    assert (prompt_logits(backbone.model, backbone, prompts) - anchored).abs().max() > 1e-3
    with backbone._reference_context() as reference:
        torch.testing.assert_close(prompt_logits(reference, backbone, prompts), anchored, atol=1e-5, rtol=0)


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "adapter"])
def test_checkpoint_and_export_carry_the_saved_modules(tiny, chats, images, tmp_path, merge):
    from transformers import AutoModelForImageTextToText

    prompts = prompts_of(chats, images)
    backbone = trained(tiny, chats, images)
    expected = prompt_logits(backbone.model, backbone, prompts)
    ckpt = lightning_checkpoint(backbone, tmp_path / "run.ckpt", config_as_dict=True)
    resumed = load_backbone_from_lightning_checkpoint(ckpt).eval()
    torch.testing.assert_close(prompt_logits(resumed.model, resumed, prompts), expected, atol=1e-6, rtol=0)
    out = export_checkpoint(ckpt, tmp_path / "export", merge_lora=merge)
    plain = AutoModelForImageTextToText.from_pretrained(out).eval()  # adapter dirs: transformers' peft integration
    torch.testing.assert_close(prompt_logits(plain, backbone, prompts), expected, atol=1e-5, rtol=0)


def test_init_from_a_run_with_saved_modules(tiny, chats, images, tmp_path):
    prompts = prompts_of(chats, images)
    sft = trained(tiny, chats, images)
    expected = prompt_logits(sft.model, sft, prompts)
    ckpt = lightning_checkpoint(sft, tmp_path / "sft.ckpt")
    adapter = export_checkpoint(ckpt, tmp_path / "adapter", merge_lora=False)
    # The same LoRA settings, from the checkpoint and from its adapter-only export; full fine-tuning (the adapter
    # merged, the copies as the modules' weights).
    for lora, source in ((SAVED, ckpt), (SAVED, adapter), (None, ckpt)):
        target = make(tiny, lora=lora)
        load_weights_for_init(target, source)
        torch.testing.assert_close(prompt_logits(target.model, target, prompts), expected, atol=1e-5, rtol=0)
    # A merged export into LoRA with saved modules: the originals (the reference) and the copies both start there.
    target = make(tiny, lora=SAVED)
    load_weights_for_init(target, export_checkpoint(ckpt, tmp_path / "merged"))
    merged_embedding = dict(sft.named_parameters())[EMBED_COPY]
    state = dict(target.named_parameters())
    for name in (f"{EMBED}.original_module.weight", EMBED_COPY):
        assert torch.equal(state[name], merged_embedding), name
    with pytest.raises(ValueError, match="match no parameter"):  # copies a LoRA run without them has no place for
        load_weights_for_init(make(tiny, lora=dataclasses.replace(SAVED, modules_to_save=None)), ckpt)


@pytest.mark.parametrize("names", [["lm_head"], ["embed_tokens", "lm_head"]])
def test_tied_embeddings_train_as_one_copy_and_export_tied(tied, chats, tmp_path, names):
    from transformers import LlamaForCausalLM

    prompts = [(chat, None) for chat in chats]
    backbone = trained(tied, chats, [None] * len(chats), lora=dataclasses.replace(SAVED, modules_to_save=names))
    base = backbone.base_model
    assert base.lm_head.modules_to_save["default"].weight is base.model.embed_tokens.modules_to_save["default"].weight
    assert not torch.equal(base.lm_head.modules_to_save["default"].weight, base.lm_head.original_module.weight)
    saved = [n for n, p in backbone.named_parameters() if p.requires_grad and ".lora_" not in n]
    assert len(saved) == 1  # one trainable matrix, one optimizer state
    ckpt = lightning_checkpoint(backbone, tmp_path / "run.ckpt")
    plain = LlamaForCausalLM.from_pretrained(export_checkpoint(ckpt, tmp_path / "export")).eval()
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(
        prompt_logits(plain, backbone, prompts), prompt_logits(backbone.model, backbone, prompts), atol=1e-5, rtol=0)


@pytest.mark.parametrize("path", ["tiny", "tied"])
def test_the_plan_counts_the_trainable_copies(path, request):
    from lit_sftrl.models import BackboneConfig
    from lit_sftrl.training.plan import PlanSettings, plan_run

    directory = request.getfixturevalue(path)
    backbone = make(directory, lora=SAVED)
    actual = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    plan = plan_run(directory, BackboneConfig(path=str(directory), lora=SAVED), PlanSettings(kind="sft"))
    assert plan.trainable == actual
    plain_lora = dataclasses.replace(SAVED, modules_to_save=None)
    without = plan_run(directory, BackboneConfig(path=str(directory), lora=plain_lora), PlanSettings(kind="sft"))
    base = backbone.base_model
    originals = (base.get_input_embeddings().original_module, base.get_output_embeddings().original_module)
    embeddings = {id(module.weight): module.weight.numel() for module in originals}  # tied: one matrix
    assert len(embeddings) == (1 if path == "tied" else 2)
    added = plan.trainable - without.trainable
    assert added == sum(embeddings.values())
    assert plan.rows["optimizer (AdamW)"] - without.rows["optimizer (AdamW)"] == 2 * 4 * added  # fp32 AdamW states


def test_a_cli_run_trains_the_saved_modules_and_exports(tiny, tmp_path, monkeypatch):
    from transformers import AutoModelForImageTextToText

    from lit_sftrl.cli import run
    from lit_sftrl.models.loading import logical_num_parameters

    monkeypatch.chdir(REPO)
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "modules_to_save": ["embed_tokens", "lm_head"]}
    run_dir = tmp_path / "sft"
    run(["fit", "--config", "configs/virl_l_sft.yaml", "--model.init_args.backbone.path", str(tiny),
         "--model.init_args.backbone.lora", json.dumps(lora), "--trainer.max_steps", "3",
         "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0", "--data.init_args.batch_size", "2",
         "--trainer.default_root_dir", str(run_dir), "--trainer.logger.init_args.save_dir", str(run_dir)])
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, weights_only=True)
    # FLOPs count the base architecture: each copy stands in for its original in the forward, it adds no compute.
    assert checkpoint["flops"]["num_parameters"] == logical_num_parameters(str(tiny))
    state = checkpoint["state_dict"]
    base = AutoModelForImageTextToText.from_pretrained(tiny)
    for copy, original in ((EMBED_COPY, base.get_input_embeddings()), (HEAD_COPY, base.lm_head)):
        assert not torch.equal(state[f"backbone.{copy}"], original.weight), copy  # three steps moved it
    plain = AutoModelForImageTextToText.from_pretrained(export_checkpoint(ckpt, tmp_path / "export"))
    assert torch.equal(plain.get_input_embeddings().weight, state[f"backbone.{EMBED_COPY}"])
    assert torch.equal(plain.lm_head.weight, state[f"backbone.{HEAD_COPY}"])
