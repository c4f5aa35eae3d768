"""Sharded SFT and PPO (FSDP2 through Lightning's ModelParallelStrategy, configs/strategies/fsdp_cpu.yaml): two CPU
processes over gloo, the tiny Mllama. Each run is the `lit-sftrl` command (Lightning starts the second process by
running it again), ~30-60 s each on this machine: these tests are few, and marked slow.

The reference is the same run under DDP with two processes: rank r trains on the same episodes and batches in both,
so sharding must change nothing but rounding (a single process would play other episodes). Stated tolerance:
absolute 1e-5 (relative 1e-4) on every logged loss and statistic, identical rollout token counts."""

from __future__ import annotations

import csv
import pickle
import shutil
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
PPO = ["--config", str(REPO / "configs/gp_l_ppo.yaml"), "--data.init_args.num_envs", "2",
       "--data.init_args.rollout_steps", "4", "--model.init_args.ppo.ppo_epochs", "1",
       "--model.init_args.ppo.minibatch_size", "4", "--model.init_args.ppo.micro_batch_size", "2",
       "--model.init_args.sampling.max_new_tokens", "8", *QUIET]
SFT = ["--config", str(REPO / "configs/gp_l_sft.yaml"), "--data.init_args.batch_size", "2",
       "--trainer.log_every_n_steps", "1", *QUIET]
PPO_STATS = ["train/policy_loss", "train/value_loss", "train/entropy", "train/approx_kl", "train/reward"]

pytestmark = pytest.mark.slow


def fit(run_dir: Path, *args: str) -> Path:
    done = subprocess.run([str(LIT), "fit", *args, "--trainer.default_root_dir", str(run_dir)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def rows(run_dir: Path, keys: list[str]) -> list[dict[str, float]]:
    with open(run_dir / "metrics.csv") as handle:
        return [{k: float(row[k]) for k in keys} for row in csv.DictReader(handle) if row.get(keys[0])]


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
    sharded = fit(tmp_path / "fsdp", *PPO, *model, *FSDP_CPU, "--trainer.max_epochs", "2")
    ddp = fit(tmp_path / "ddp", *PPO, *model, *DDP_CPU, "--trainer.max_epochs", "2")
    keys = [*PPO_STATS, "train/rollout_tokens"]
    assert_close(rows(sharded, keys), rows(ddp, keys))  # update 2 rolls out from the weights update 1 left
    tokens = [[row["train/rollout_tokens"] for row in rows(run, keys)] for run in (sharded, ddp)]
    assert tokens[0] == tokens[1]
    last = sharded / "checkpoints" / "last.ckpt"
    assert sorted(p.name for p in last.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]

    resumed = tmp_path / "resumed"
    fit(resumed, *PPO, *model, *FSDP_CPU, "--trainer.max_epochs", "1")
    fit(resumed, *PPO, *model, *FSDP_CPU, "--trainer.max_epochs", "2", "--ckpt_path", "last")
    assert rows(resumed, keys) == rows(sharded, keys)  # exact: the same episodes, weights, optimizer state

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
    """LoRA adapters sharded with their frozen base weights; the KL reference is the adapter disabled."""
    lora = ["--model.init_args.backbone.path", str(tiny_dir_factory("mllama")), "--trainer.max_epochs", "2",
            "--model.init_args.backbone.lora.r", "4", "--model.init_args.backbone.lora.alpha", "8",
            "--model.init_args.backbone.lora.dropout", "0.0", "--model.init_args.ppo.kl_coef", "0.1"]
    sharded = fit(tmp_path / "fsdp", *PPO, *lora, *FSDP_CPU)
    ddp = fit(tmp_path / "ddp", *PPO, *lora, *DDP_CPU)
    keys = [*PPO_STATS, "train/kl_to_reference", "train/rollout_tokens"]
    assert_close(rows(sharded, keys), rows(ddp, keys))
    assert rows(sharded, keys)[-1]["train/kl_to_reference"] > 0  # the adapter moved away from the reference
