"""Model families as users hold them: Qwen2-VL and Qwen2.5-VL directories in the Hub's and transformers 5's layouts
(no torchvision: the processors load image-only) through validate, SFT, PPO and export, with exports that plain
transformers reloads; tied weights stored once; LoRA SFT into full fine-tuning PPO through init_from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from family_dirs import LAYOUTS, QWEN_FAMILIES, make_qwen_dir

from lit_sftrl.cli import run
from lit_sftrl.models import Backbone, BackboneConfig, LoraSettings, SamplingConfig
from lit_sftrl.models.export import export_checkpoint, load_weights_for_init, save_backbone
from lit_sftrl.models.inflight import supports_inflight
from lit_sftrl.training.sft import sft_loss

REPO = Path(__file__).resolve().parents[1]
LORA = LoraSettings(r=4, alpha=8, dropout=0.0)


@pytest.fixture(scope="session")
def qwen_factory(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("qwen")
    built: dict[tuple[str, str], Path] = {}

    def factory(family: str, layout: str) -> Path:
        if (family, layout) not in built:
            built[family, layout] = make_qwen_dir(root / f"{family}-{layout}", family, layout, corpus)
        return built[family, layout]

    return factory


def _plain_logits(directory: Path, chat, image) -> torch.Tensor:
    """Logits of the last prompt position, by plain transformers alone (no lit-sftrl class registered)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(directory)
    model = AutoModelForImageTextToText.from_pretrained(directory).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": chat[0]["content"]}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    with torch.no_grad():
        return model(**processor(text=[text], images=[[image]], return_tensors="pt")).logits[0, -1]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_qwen_loads_image_only_trains_and_exports_for_plain_transformers(
    qwen_factory, family, layout, chats, images, tmp_path
):
    from PIL import Image

    from lit_sftrl.models.processors import PLAIN_IMAGE_ONLY_PROCESSOR

    backbone = Backbone(BackboneConfig(path=str(qwen_factory(family, layout)), lora=LORA, value_head=True)).eval()
    assert not supports_inflight(backbone)  # 3-D rotary positions: the rollout engine decodes Qwen in lockstep
    prompts = [(chats[0], images[0]), (chats[1], images[3])]
    generations = backbone.generate(prompts, SamplingConfig(temperature=0.7, max_new_tokens=5))
    scores = backbone.score(prompts, [g.answer_ids for g in generations], temperature=0.7)
    for generation, logprobs in zip(generations, scores.token_logprobs):
        assert (generation.logprobs - logprobs.detach()).abs().max() < 1e-4  # PPO's first ratio is exactly 1
    answers = [(chat + [{"role": "assistant", "content": '{"formula": "1 + 2"}'}], image) for chat, image in prompts]
    logits, labels, _ = backbone.train().label_logits(backbone.sft_batch(answers))
    loss = sft_loss(logits, labels)
    loss.backward()
    with torch.no_grad():
        for name, param in backbone.named_parameters():
            if "lora_B" in name:
                param.add_(0.05)  # a visible adapter: the merged export must differ from the base
    backbone.eval()
    out = save_backbone(backbone, tmp_path / "export")
    assert json.loads((out / "processor_config.json").read_text())["processor_class"] == PLAIN_IMAGE_ONLY_PROCESSOR
    image = Image.fromarray(images[0])
    ours = backbone._forward(backbone.model, backbone.encoder.encode_prompts([(chats[0], images[0])]), keep=1)[0][0, -1]
    torch.testing.assert_close(_plain_logits(out, chats[0], image), ours.detach(), atol=1e-4, rtol=0)
    # lit-sftrl reads its own export back (and the image-only class is not needed for it).
    again = Backbone(BackboneConfig(path=str(out)))
    assert type(again.processor).__name__ == PLAIN_IMAGE_ONLY_PROCESSOR


def _cli(*argv: str):
    return run(list(argv))


SMALL_RUN = ("--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
             "--data.init_args.evaluation.val_episodes", "2", "--data.init_args.evaluation.chunk", "2",
             "--data.init_args.task.image_size", "64", "--model.init_args.eval_sampling.max_new_tokens", "8")


# Both families and both layouts, crossed: past loading (tested for all four above) the layout changes nothing.
@pytest.mark.parametrize(("family", "layout"), [("qwen2_vl", "v5"), ("qwen2_5_vl", "hub")])
@pytest.mark.slow
def test_qwen_through_validate_sft_ppo_and_export(qwen_factory, family, layout, tmp_path, monkeypatch):
    """The command line, as a user runs it: validate zero-shot, LoRA SFT, full fine-tuning PPO initialised from the
    LoRA run (the adapter merges in), export; the export reloads in plain transformers. Evaluation runs once, in
    validate: the fits skip it (time)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    monkeypatch.chdir(REPO)
    path = str(qwen_factory(family, layout))
    sft_dir, ppo_dir = tmp_path / "sft", tmp_path / "ppo"
    _cli("validate", "--config", "configs/gp_vl_sft.yaml", "--model.init_args.backbone.path", path,
         "--trainer.default_root_dir", str(tmp_path / "zero"), "--trainer.logger", "false", *SMALL_RUN)
    _cli("fit", "--config", "configs/gp_vl_sft.yaml", "--model.init_args.backbone.path", path,
         "--model.init_args.backbone.lora", json.dumps({"r": 4, "alpha": 8, "dropout": 0.0}),
         "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
         "--data.init_args.batch_size", "2", "--trainer.logger.init_args.save_dir", str(sft_dir),
         "--trainer.default_root_dir", str(sft_dir), *SMALL_RUN)
    sft_ckpt = sft_dir / "checkpoints" / "last.ckpt"
    assert sft_ckpt.exists()
    _cli("fit", "--config", "configs/gp_vl_ppo.yaml", "--model.init_args.backbone.path", path,
         "--model.init_args.init_from", str(sft_ckpt), "--trainer.max_epochs", "1",
         "--trainer.limit_val_batches", "0",
         "--data.init_args.num_envs", "2", "--data.init_args.rollout_steps", "2",
         "--model.init_args.ppo.minibatch_size", "2", "--model.init_args.ppo.micro_batch_size", "2",
         "--model.init_args.ppo.ppo_epochs", "1", "--model.init_args.sampling.max_new_tokens", "8",
         "--trainer.logger.init_args.save_dir", str(ppo_dir), "--trainer.default_root_dir", str(ppo_dir), *SMALL_RUN)
    out = export_checkpoint(ppo_dir / "checkpoints" / "last.ckpt", tmp_path / "export")
    assert AutoModelForImageTextToText.from_pretrained(out).config.model_type == family
    assert AutoProcessor.from_pretrained(out).image_processor.merge_size == 2


def test_init_from_a_lora_run_into_full_fine_tuning_merges_the_adapter(tiny_dir_factory, chats, images, tmp_path):
    from test_backbone import lightning_checkpoint, prompt_logits, prompts_of, sft_conversations, train_step

    path = tiny_dir_factory("llava")
    sft = Backbone(BackboneConfig(path=str(path), lora=LORA, value_head=True))
    train_step(sft.train(), sft_conversations(chats, images), lr=5e-2)
    full = Backbone(BackboneConfig(path=str(path), value_head=True)).eval()
    load_weights_for_init(full, lightning_checkpoint(sft.eval(), tmp_path / "sft.ckpt"))
    prompts = prompts_of(chats, images)
    expected = prompt_logits(sft.model, sft, prompts)
    assert (
        expected - prompt_logits(Backbone(BackboneConfig(path=str(path))).eval().model, sft, prompts)
    ).abs().max() > 1e-3
    torch.testing.assert_close(prompt_logits(full.model, full, prompts), expected, atol=1e-5, rtol=0)


def test_merged_export_of_a_tied_model_stores_the_embeddings_once(tiny_dir_factory, tmp_path):
    """Tied input/output embeddings (SmolLM2, Gemma3): the merged export is the base's size, within 1 %."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir_factory("mllama"))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=128, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    backbone = Backbone(BackboneConfig(path=str(tmp_path / "base"), lora=LORA))
    out = save_backbone(backbone, tmp_path / "merged")
    base_size, merged_size = ((d / "model.safetensors").stat().st_size for d in (tmp_path / "base", out))
    assert abs(merged_size - base_size) <= 0.01 * base_size
    reloaded = LlamaForCausalLM.from_pretrained(out)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
