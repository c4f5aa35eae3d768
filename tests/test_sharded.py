"""Sharded SFT and PPO (FSDP2 through Lightning's ModelParallelStrategy, configs/strategies/fsdp_cpu.yaml): two CPU
processes over gloo, the tiny Mllama and the tiny LLaVA. Each run is the `lit-sftrl` command (Lightning starts the
second process by running it again), ~30-60 s each on this machine: these tests are few, and marked slow.

The reference is the same run under DDP with two processes: rank r trains on the same episodes and batches in both,
so sharding must change nothing but rounding (a single process would play other episodes). Stated tolerance:
absolute 1e-5 (relative 1e-4) on every logged loss and statistic, identical rollout token counts."""

from __future__ import annotations

import csv
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
LIT = Path(sys.executable).with_name("lit-sftrl")
FSDP_CPU = ["--config", str(REPO / "configs/strategies/fsdp_cpu.yaml")]
DDP_CPU = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
QUIET = ["--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0"]
PPO_SHAPE = ["--data.init_args.num_envs", "2", "--data.init_args.rollout_steps", "4",
             "--model.init_args.ppo.ppo_epochs", "1", "--model.init_args.ppo.minibatch_size", "4",
             "--model.init_args.ppo.micro_batch_size", "2", "--model.init_args.sampling.max_new_tokens", "8", *QUIET]
PPO = ["--config", str(REPO / "configs/gp_l_ppo.yaml"), *PPO_SHAPE]
PPO_VL = ["--config", str(REPO / "configs/gp_vl_ppo.yaml"), *PPO_SHAPE]  # card images: the vision tower runs
SFT = ["--config", str(REPO / "configs/gp_l_sft.yaml"), "--data.init_args.batch_size", "2",
       "--trainer.log_every_n_steps", "1", *QUIET]
PPO_STATS = ["train/policy_loss", "train/value_loss", "train/entropy", "train/approx_kl", "train/reward"]

pytestmark = pytest.mark.slow


def fit(run_dir: Path, *args: str, timeout: float = 600) -> Path:
    # Its own process group: a run that hangs is ended with the rank Lightning started beside it.
    with subprocess.Popen([str(LIT), "fit", *args, "--trainer.default_root_dir", str(run_dir)], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True) as run:
        try:
            _, stderr = run.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
            run.communicate()
            pytest.fail(f"{run_dir.name}: no end within {timeout:.0f} s (ranks waiting on each other?)")
    assert run.returncode == 0, stderr[-3000:]
    return run_dir


def rows(run_dir: Path, keys: list[str]) -> list[dict[str, float]]:
    with open(run_dir / "metrics.csv") as handle:
        return [{k: float(row[k]) for k in keys} for row in csv.DictReader(handle) if row.get(keys[0])]


def every_update_config(tmp_path: Path) -> Path:
    """A config that keeps each update's checkpoint (a resume starts from the first; one run fewer than stopping
    a run after one update and resuming it)."""
    config = tmp_path / "every_update.yaml"
    config.write_text("trainer:\n  callbacks:\n    - class_path: lit_sftrl.run.checkpoint_io.RunCheckpoint\n"
                      "      init_args: {every_n_epochs: 1, save_on_train_epoch_end: true, save_top_k: -1,"
                      " save_last: true}\n")
    return config


def first_update_checkpoint(run_dir: Path) -> Path:
    return min((run_dir / "checkpoints").glob("epoch=*.ckpt"), key=lambda path: path.stat().st_mtime)


def assert_close(sharded: list[dict[str, float]], reference: list[dict[str, float]]) -> None:
    assert len(sharded) == len(reference) > 0
    for ours, theirs in zip(sharded, reference):
        for key, value in theirs.items():
            assert ours[key] == pytest.approx(value, rel=1e-4, abs=1e-5), (key, ours, theirs)


def test_sharded_ppo_matches_ddp_resumes_exactly_exports_and_inits(tmp_path, tiny_dir_factory):
    from lit_sftrl.core.compute import FlopsCounter
    from lit_sftrl.models.backbone import Backbone, BackboneConfig
    from lit_sftrl.models.export import (
        UnsafeCheckpointError,
        check_lightning_checkpoint,
        export_checkpoint,
        inherited_flops,
        load_backbone_from_lightning_checkpoint,
        load_weights_for_init,
        read_lightning_checkpoint,
    )

    model = ["--model.init_args.backbone.path", str(tiny_dir_factory("mllama"))]
    sharded = fit(tmp_path / "fsdp", *PPO, *model, *FSDP_CPU, "--trainer.max_epochs", "2",
                  "--config", str(every_update_config(tmp_path)))
    ddp = fit(tmp_path / "ddp", *PPO, *model, *DDP_CPU, "--trainer.max_epochs", "2")
    keys = [*PPO_STATS, "train/rollout_tokens"]
    assert_close(rows(sharded, keys), rows(ddp, keys))  # update 2 rolls out from the weights update 1 left
    tokens = [[row["train/rollout_tokens"] for row in rows(run, keys)] for run in (sharded, ddp)]
    assert tokens[0] == tokens[1]
    last = sharded / "checkpoints" / "last.ckpt"
    assert sorted(p.name for p in last.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]

    # Resumed from the sharded checkpoint of update 1: update 2 is the unbroken run's, exactly (the same episodes,
    # weights and optimizer state).
    resumed = fit(tmp_path / "resumed", *PPO, *model, *FSDP_CPU, "--trainer.max_epochs", "2",
                  "--ckpt_path", str(first_update_checkpoint(sharded)))
    assert rows(resumed, keys) == rows(sharded, keys)[1:]

    # The sharded checkpoint reads back whole in one process: the same weights as DDP's, and exports.
    ours = load_backbone_from_lightning_checkpoint(last).trainable_state_dict()
    theirs = load_backbone_from_lightning_checkpoint(ddp / "checkpoints" / "last.ckpt").trainable_state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in ours)
    exported = Backbone(BackboneConfig(path=str(export_checkpoint(last, tmp_path / "export")), value_head=True))
    assert all(torch.equal(exported.trainable_state_dict()[k], ours[k]) for k in ours)

    # init_from the sharded checkpoint into an unsharded run: its weights (value head apart) and its FLOPs.
    single = Backbone(BackboneConfig(path=str(tiny_dir_factory("mllama")), value_head=True))
    load_weights_for_init(single, last)
    assert all(torch.equal(v, ours[k]) for k, v in single.trainable_state_dict().items() if "value_head" not in k)
    assert inherited_flops(last) == FlopsCounter(**read_lightning_checkpoint(last, mmap=True)["flops"]).total > 0

    # The index torch unpickles as is: one that names any other code is refused before anything reads it.
    crafted = tmp_path / "crafted.ckpt"
    shutil.copytree(last, crafted)
    (crafted / ".metadata").write_bytes(pickle.dumps(Harmless()))
    with pytest.raises(UnsafeCheckpointError, match="builtins.print"):
        check_lightning_checkpoint(crafted)


class Harmless:
    def __reduce__(self):
        return print, ("a pickle that calls a function",)


def test_sharded_sft_matches_ddp_and_starts_sharded_ppo(tmp_path, tiny_dir_factory):
    from lit_sftrl.models.export import read_lightning_checkpoint

    model = ["--model.init_args.backbone.path", str(tiny_dir_factory("mllama"))]
    sharded = fit(tmp_path / "fsdp", *SFT, *model, *FSDP_CPU, "--trainer.max_steps", "3")
    ddp = fit(tmp_path / "ddp", *SFT, *model, *DDP_CPU, "--trainer.max_steps", "3")
    assert_close(rows(sharded, ["train/loss"]), rows(ddp, ["train/loss"]))  # steps 2-3 follow the sharded update

    # init_from a single-file (unsharded) checkpoint into a sharded PPO run: its FLOPs become the run's start.
    sft_checkpoint = ddp / "checkpoints" / "last.ckpt"
    ppo = fit(tmp_path / "ppo", *PPO, *model, *FSDP_CPU, "--trainer.max_epochs", "1",
              "--model.init_args.init_from", str(sft_checkpoint))
    start = read_lightning_checkpoint(sft_checkpoint)["flops"]
    after = read_lightning_checkpoint(ppo / "checkpoints" / "last.ckpt", mmap=True)["flops"]
    assert after["initial"] == pytest.approx(start["initial"] + 6 * start["num_parameters"] * start["train_tokens"]
                                             + 2 * start["num_parameters"] * start["inference_tokens"])


def test_sharded_ppo_with_lora_and_kl_reference_matches_ddp(tmp_path, tiny_dir_factory):
    """LoRA adapters sharded with their frozen base weights, and the output layer trained in full beside them
    (``modules_to_save``); the KL reference is the adapter disabled, the original output layer."""
    lora = ["--model.init_args.backbone.path", str(tiny_dir_factory("mllama")), "--trainer.max_epochs", "2",
            "--model.init_args.backbone.lora.r", "4", "--model.init_args.backbone.lora.alpha", "8",
            "--model.init_args.backbone.lora.dropout", "0.0", "--model.init_args.backbone.lora.modules_to_save",
            "[lm_head]", "--model.init_args.ppo.kl_coef", "0.1"]
    sharded = fit(tmp_path / "fsdp", *PPO, *lora, *FSDP_CPU)
    ddp = fit(tmp_path / "ddp", *PPO, *lora, *DDP_CPU)
    keys = [*PPO_STATS, "train/kl_to_reference", "train/rollout_tokens"]
    assert_close(rows(sharded, keys), rows(ddp, keys))
    assert rows(sharded, keys)[-1]["train/kl_to_reference"] > 0  # the adapter moved away from the reference
    # The trained copy of the output layer, gathered from the shards, is DDP's, and moved off the original.
    from lit_sftrl.models.export import load_backbone_from_lightning_checkpoint

    ours, theirs = (load_backbone_from_lightning_checkpoint(run / "checkpoints" / "last.ckpt").state_dict()
                    for run in (sharded, ddp))
    copies = {k: v for k, v in ours.items() if ".modules_to_save." in k}
    assert copies and all(torch.allclose(v, theirs[k], atol=1e-6) for k, v in copies.items())
    original = {k: v for k, v in ours.items() if ".original_module." in k}
    assert len(original) == len(copies) and all(not torch.equal(a, b) for a, b in zip(original.values(),
                                                                                     copies.values()))


def test_llava_sharded_ppo_with_a_frozen_kl_reference_matches_ddp_and_resumes_exactly(tmp_path, tiny_dir_factory):
    """The LLaVA family on GP-VL (card images), full fine-tuning with kl_coef 0.1: the CLIP tower's encoder layers
    are FSDP units like the decoder's, and the KL reference is a frozen copy of the model, sharded the same way."""
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    from lit_sftrl.models.backbone import Backbone, BackboneConfig
    from lit_sftrl.models.export import load_backbone_from_lightning_checkpoint
    from lit_sftrl.training.sharding import repeated_layers

    llava = tiny_dir_factory("llava")
    base = Backbone(BackboneConfig(path=str(llava)))
    units = repeated_layers(base.model)
    assert sum(isinstance(unit, CLIPEncoderLayer) for unit in units) == 2 and len(units) == 2 + 4  # vision + text

    # A constant learning rate: a cosine schedule's length follows max_epochs, which a resume may not change.
    args = [*PPO_VL, "--model.init_args.backbone.path", str(llava), "--model.init_args.ppo.kl_coef", "0.1",
            "--model.init_args.optim.schedule", "constant", "--trainer.max_epochs", "2"]
    sharded = fit(tmp_path / "fsdp", *args, *FSDP_CPU, "--config", str(every_update_config(tmp_path)))
    ddp = fit(tmp_path / "ddp", *args, *DDP_CPU)
    keys = [*PPO_STATS, "train/kl_to_reference", "train/rollout_tokens"]
    assert_close(rows(sharded, keys), rows(ddp, keys))
    assert rows(sharded, keys)[-1]["train/kl_to_reference"] > 0  # the policy moved away from the frozen copy
    tokens = [[row["train/rollout_tokens"] for row in rows(run, keys)] for run in (sharded, ddp)]
    assert tokens[0] == tokens[1]
    # The weights after two updates, the CLIP tower's included (the images train it), are DDP's.
    ours, theirs = (load_backbone_from_lightning_checkpoint(run / "checkpoints" / "last.ckpt").trainable_state_dict()
                    for run in (sharded, ddp))
    assert ours.keys() == theirs.keys() and all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in ours)
    before = base.trainable_state_dict()
    vision = [k for k in before if "vision_tower" in k]
    assert vision and any(not torch.equal(ours[k], before[k]) for k in vision)

    resumed = fit(tmp_path / "resumed", *args, *FSDP_CPU, "--ckpt_path", str(first_update_checkpoint(sharded)))
    assert rows(resumed, keys) == rows(sharded, keys)[1:]  # exact; the frozen reference re-made from the base model


# Run by torchrun on 2 processes: the modules' configure_model on a 2-rank mesh, as ModelParallelStrategy calls it.
SHARDED_REFERENCE = """
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule

from lit_sftrl.models.config import BackboneConfig
from lit_sftrl.training.ppo import PPOConfig, PPOModule
from lit_sftrl.training.sharding import repeated_layers

dist.init_process_group("gloo")
module = PPOModule(BackboneConfig(path=sys.argv[1]), PPOConfig(kl_coef=0.1))
module._trainer = SimpleNamespace(precision="32-true", strategy=SimpleNamespace(root_device=torch.device("cpu")))
module._device_mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("data_parallel",))
module.configure_model()
reference = module.backbone.frozen_reference
assert all(isinstance(unit, FSDPModule) for unit in [reference, *repeated_layers(reference)])
whole = sum(p.numel() for p in reference.parameters())
held = sum(p.to_local().numel() for p in reference.parameters())
assert held < 0.51 * whole, (held, whole)
dist.destroy_process_group()
"""


def test_the_frozen_kl_reference_is_sharded_like_the_model(tmp_path, tiny_dir_factory):
    script = tmp_path / "sharded_reference.py"
    script.write_text(SHARDED_REFERENCE)
    done = subprocess.run([str(LIT.with_name("torchrun")), "--standalone", "--nproc_per_node", "2", str(script),
                           str(tiny_dir_factory("llava"))], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_sharded_sft_on_mixed_image_and_text_only_samples_matches_ddp(tmp_path, tiny_dir_factory):
    """A LLaVA-style file mixing image and text-only samples: ranks whose batches hold different kinds run the
    same forward passes (a stand-in weighing nothing for a kind a rank lacks); without that they wait on each
    other for ever, which the timeout turns into a failure."""
    from PIL import Image

    from lit_sftrl.data.datamodules import LlavaSource, SFTBatches

    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "card.png")
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps([
        {"image": "card.png", "conversations": [{"from": "human", "value": "<image>\nWhat card?"},
                                                {"from": "gpt", "value": "a red one"}]},
        {"conversations": [{"from": "human", "value": "Cards: 3 8"}, {"from": "gpt", "value": "8/(3-8/3)"}]},
    ]))
    # The draws this test relies on: in step 1 rank 0 has no text-only sample, in step 2 no image, rank 1 both.
    source = LlavaSource(str(data), None)
    kinds = [[{sample["image"] is not None for sample in batch} for batch, _ in zip(SFTBatches(source, 2, 0, rank, 0),
                                                                                    range(2))] for rank in (0, 1)]
    assert kinds == [[{True}, {False}], [{True, False}, {True, False}]]

    sft = [*SFT, "--model.init_args.backbone.path", str(tiny_dir_factory("llava")), "--data.init_args.llava_json",
           str(data), "--trainer.max_steps", "2"]
    sharded = fit(tmp_path / "fsdp", *sft, *FSDP_CPU, timeout=240)
    ddp = fit(tmp_path / "ddp", *sft, *DDP_CPU)
    assert_close(rows(sharded, ["train/loss"]), rows(ddp, ["train/loss"]))
    assert rows(sharded, ["train/tokens"]) == rows(ddp, ["train/tokens"])  # stand-ins are not counted
