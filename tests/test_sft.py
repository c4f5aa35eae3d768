"""SFT through the lit-sftrl command line on the tiny model: the loss falls, validation and test write their
records, a killed run resumes exactly, and a 2-process CPU DDP fit gives each rank its own episodes.

Every fit is a few seconds: a GP-L config derived from configs/gp_l_sft.yaml, batch 2-4, a handful of steps,
evaluation on 2-3 episodes with one attempt and short answers. Nothing is written under the repository.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from lit_sftrl.cli import run
from lit_sftrl.run.checkpoint_io import AtomicCheckpointIO

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


class RecordBatches(Callback):
    """Test helper, loaded by class path: writes each rank's batch (its conversations) per optimizer step."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"rank{trainer.global_rank}-step{trainer.global_step}.json"
        path.write_text(json.dumps([sample["messages"] for sample in batch]))


class KillAt(Callback):
    """Test helper: the run dies when it is about to take optimizer step ``step`` (after earlier checkpoints)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"killed at step {self.step}")


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"



@pytest.fixture(scope="module")
def tiny(tiny_dir_factory) -> Path:
    return tiny_dir_factory("mllama")


def small_config(tmp: Path, tiny: Path, *, steps: int, every: int | None = None, batch_size: int = 2,
                 validate: bool = False, callbacks: list[dict] = (), lr: float = 1e-3) -> Path:
    """configs/gp_l_sft.yaml, shrunk: the run directory is ``tmp``; checkpoints every ``every`` steps (and last)."""
    config = copy.deepcopy(yaml.safe_load((REPO / "configs/gp_l_sft.yaml").read_text()))
    trainer = config["trainer"]
    trainer.update(
        accelerator="cpu", max_steps=steps, log_every_n_steps=1, default_root_dir=str(tmp),
        enable_progress_bar=False, enable_model_summary=False,
        val_check_interval=steps, num_sanity_val_steps=-1 if validate else 0, limit_val_batches=None if validate else 0,
    )
    trainer["logger"]["init_args"]["save_dir"] = str(tmp)
    checkpoint = {"save_last": True, "save_top_k": -1, "every_n_train_steps": every or steps}
    trainer["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": checkpoint}, *callbacks
    ]
    model = config["model"]["init_args"]
    model["backbone"]["path"] = str(tiny)
    model["optim"] = {"lr": lr, "warmup_steps": 0, "schedule": "constant"}
    model["eval_sampling"]["max_new_tokens"] = 8
    data = config["data"]["init_args"]
    data["batch_size"] = batch_size
    data["task"]["verify_iter"] = 1
    data["evaluation"] = {"val_episodes": 2, "test_episodes": 3, "chunk": 2, "seed": 1234}
    path = tmp.parent / f"{tmp.name}.yaml"  # beside the run directory, which the logger wants empty
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------- a short fit


@pytest.fixture(scope="module")
def short_fit(tmp_path_factory, tiny):
    """12 steps of batch 4 with a sanity evaluation before the first step and one after the last."""
    run_dir = tmp_path_factory.mktemp("short_fit") / "run"
    cli = run(["fit", "--config", str(small_config(run_dir, tiny, steps=12, batch_size=4, validate=True))])
    return cli, run_dir


def test_a_short_fit_lowers_the_loss(short_fit):
    cli, run_dir = short_fit
    assert cli.trainer.global_step == 12
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)  # kills never leave half a file
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    train = [row for row in rows if row.get("train/loss")]
    losses = [float(row["train/loss"]) for row in train]
    assert len(losses) == 12
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.8 * first, losses
    # Tokens and FLOPs are logged every step and only grow; the last logged value is the module's counter.
    flops = [float(row["train/flops"]) for row in train]
    tokens = [float(row["train/tokens"]) for row in train]
    assert all(b > a for a, b in zip(flops, flops[1:])) and all(b > a for a, b in zip(tokens, tokens[1:]))
    assert cli.model.flops.total == 6 * cli.model.backbone.num_parameters * cli.model.tokens_seen
    # float32 logs
    assert (flops[-1], tokens[-1]) == pytest.approx((cli.model.flops.total, cli.model.tokens_seen), rel=1e-6)


def test_validation_writes_records_with_step_flops_and_metrics(short_fit):
    cli, run_dir = short_fit
    records = sorted(path.name for path in (run_dir / "eval").glob("*.json"))
    assert records == ["sanity-step0000000.json", "val-step0000012.json"]
    sanity, val = (read_json(run_dir / "eval" / name) for name in records)
    assert sanity["step"] == 0 and sanity["flops"] == 0
    assert val["stage"] == "val" and val["step"] == 12 and val["flops"] == cli.model.flops.total > 0
    assert val["module"] == "SFTModule" and val["task"] == "gp_l"
    assert set(val["metrics"]) == {"id", "rule_ood"}
    for metrics in val["metrics"].values():
        assert metrics["episodes"] == 2 and metrics["attempts"] == 1.0  # verify_iter 1
        for name in ("success", "well_formed", "per_step_accuracy"):
            assert 0.0 <= metrics[name] <= 1.0 and f"{name}_stderr" in metrics
    # The same numbers went to the logger.
    logged = [row for row in csv.DictReader((run_dir / "metrics.csv").open()) if row.get("val/id/episodes")]
    assert [float(logged[0]["val/id/success"]), float(logged[0]["val/id/episodes"])] == [
        val["metrics"]["id"]["success"], 2.0
    ]


def test_lit_sftrl_test_on_a_checkpoint_writes_a_test_record(short_fit, tmp_path, tiny):
    cli, run_dir = short_fit
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()
    test_dir = tmp_path / "test_run"
    tester = run(["test", "--config", str(small_config(test_dir, tiny, steps=12)), "--ckpt_path", str(checkpoint)])
    [record_path] = (test_dir / "eval").glob("test-*.json")
    record = read_json(record_path)
    assert record["stage"] == "test" and record["checkpoint"] == str(checkpoint)
    assert record["step"] == 12 and record_path.name == "test-step0000012.json"  # the checkpoint's step
    assert record["flops"] == cli.model.flops.total  # the checkpoint's FLOPs; evaluating adds none to training's
    assert {variant: m["episodes"] for variant, m in record["metrics"].items()} == {"id": 3, "rule_ood": 3}
    # The weights evaluated are the checkpoint's.
    trained, loaded = cli.model.backbone.trainable_state_dict(), tester.model.backbone.trainable_state_dict()
    assert trained.keys() == loaded.keys() and all(torch.equal(trained[k], loaded[k]) for k in trained)


def test_an_exported_run_evaluates_like_its_checkpoint_and_keeps_its_flops(short_fit, tmp_path, tiny):
    cli, run_dir = short_fit
    exported = run(
        ["export", "--ckpt", str(run_dir / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "exported")]
    )
    records = {}
    for name, overrides in (("from_dir", ["--model.backbone.path", str(exported)]),
                            ("from_ckpt", ["--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")])):
        run(["test", "--config", str(small_config(tmp_path / name, tiny, steps=12)), *overrides])
        [path] = (tmp_path / name / "eval").glob("test-*.json")
        records[name] = read_json(path)
    assert records["from_dir"]["metrics"] == records["from_ckpt"]["metrics"]
    assert records["from_dir"]["flops"] == records["from_ckpt"]["flops"] == cli.model.flops.total


# ------------------------------------------------------------------------------------- kill and resume


def recorded(folder: Path) -> dict[str, list]:
    return {path.name: read_json(path) for path in sorted(folder.glob("*.json"))}


@pytest.mark.slow
def test_a_killed_and_resumed_fit_matches_an_uninterrupted_one(tmp_path, tiny):
    steps, every, kill = 6, 3, 4

    def callbacks(batches: Path, *extra: dict) -> list[dict]:
        return [{"class_path": class_path(RecordBatches), "init_args": {"out": str(batches)}}, *extra]

    whole_dir = tmp_path / "whole"
    whole = run(["fit", "--config", str(small_config(whole_dir, tiny, steps=steps, every=every,
                                                      callbacks=callbacks(whole_dir / "batches")))])

    broken_dir = tmp_path / "broken"
    killer = {"class_path": class_path(KillAt), "init_args": {"step": kill}}
    killed_config = small_config(
        broken_dir, tiny, steps=steps, every=every, callbacks=callbacks(broken_dir / "batches", killer)
    )
    with pytest.raises(RuntimeError, match=f"killed at step {kill}"):
        run(["fit", "--config", str(killed_config)])
    saved = torch.load(broken_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == every and saved["SFTDataModule"] == {"batches_consumed": every}

    resume_config = small_config(
        broken_dir, tiny, steps=steps, every=every, callbacks=callbacks(broken_dir / "batches")
    )
    resumed = run(["fit", "--config", str(resume_config), "--ckpt_path", "last"])

    assert resumed.trainer.global_step == whole.trainer.global_step == steps
    assert resumed.datamodule.state_dict() == whole.datamodule.state_dict() == {"batches_consumed": steps}
    # The same batch at every step (the resumed run replayed step 3, which the killed run had started)...
    assert recorded(broken_dir / "batches") == recorded(whole_dir / "batches")
    assert len(recorded(whole_dir / "batches")) == steps
    # ...so the same weights, optimizer and counters.
    a, b = whole.model.backbone.trainable_state_dict(), resumed.model.backbone.trainable_state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert resumed.model.tokens_seen == whole.model.tokens_seen
    assert resumed.model.flops.state_dict() == whole.model.flops.state_dict()
    opt_a, opt_b = (cli.trainer.optimizers[0].state_dict()["state"] for cli in (whole, resumed))
    assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a)


# ------------------------------------------------------------------------------------- DDP


def ddp_fit(run_dir: Path, tiny: Path, *extra: str) -> subprocess.CompletedProcess:
    """``lit-sftrl fit ... --trainer.accelerator cpu --trainer.devices 2 --trainer.strategy ddp`` in a subprocess
    (Lightning relaunches the command line for rank 1); each rank's batches are recorded."""
    config = small_config(run_dir, tiny, steps=2, callbacks=[
        {"class_path": "test_sft.RecordBatches", "init_args": {"out": str(run_dir / "batches")}}
    ])
    env = {
        **os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)]),
    }
    return subprocess.run(
        [sys.executable, "-m", "lit_sftrl.cli", "fit", "--config", str(config),
         "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp", *extra],
        capture_output=True, text=True, env=env, timeout=400, cwd=run_dir.parent,
    )


@pytest.mark.slow
def test_two_process_cpu_ddp_gives_each_rank_different_episodes(tmp_path, tiny):
    from lit_sftrl.data.datamodules import ExpertSource, SFTBatches
    from lit_sftrl.data.tasks import TaskConfig
    from lit_sftrl.models.backbone import Backbone, BackboneConfig

    run_dir = tmp_path / "ddp"
    result = ddp_fit(run_dir, tiny)
    assert result.returncode == 0, result.stderr[-5000:]
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2 and checkpoint["SFTDataModule"] == {"batches_consumed": 2}

    seen = recorded(run_dir / "batches")
    assert sorted(seen) == ["rank0-step0.json", "rank0-step1.json", "rank1-step0.json", "rank1-step1.json"]
    prompts = {
        rank: {json.dumps(conversation[0]) for step in (0, 1) for conversation in seen[f"rank{rank}-step{step}.json"]}
        for rank in (0, 1)
    }
    assert len(prompts[0]) == len(prompts[1]) == 4 and prompts[0].isdisjoint(prompts[1])
    # Each rank drew exactly its own stream: batch b of rank r is a function of (seed, r, b).
    source = ExpertSource(TaskConfig(name="gp_l", verify_iter=1), multi_turn=0.0)
    expected = {}
    for rank in (0, 1):
        stream = iter(SFTBatches(source, 2, seed=0, rank=rank, start=0))
        for step in (0, 1):
            expected[f"rank{rank}-step{step}.json"] = next(stream)
    assert seen == {name: [sample["messages"] for sample in batch] for name, batch in expected.items()}
    # Tokens (so FLOPs) are summed over both ranks.
    backbone = Backbone(BackboneConfig(path=str(tiny)))
    tokens = sum(
        backbone.count_tokens(backbone.sft_batch([(s["messages"], s["image"]) for s in batch]))
        for batch in expected.values()
    )
    assert checkpoint["tokens_seen"] == checkpoint["flops"]["train_tokens"] == tokens


@pytest.mark.slow
def test_two_process_cpu_ddp_validation_plays_each_episode_once(tmp_path, tiny):
    run_dir = tmp_path / "ddp"
    # 3 chunks of one episode on 2 ranks: Lightning's DistributedSampler would pad rank 1 with a repeated chunk.
    result = ddp_fit(run_dir, tiny, "--trainer.limit_val_batches", "null", "--trainer.num_sanity_val_steps", "-1",
                     "--data.init_args.evaluation.val_episodes", "3", "--data.init_args.evaluation.chunk", "1")
    assert result.returncode == 0, result.stderr[-5000:]
    records = {path.name: read_json(path) for path in (run_dir / "eval").glob("*.json")}
    assert sorted(records) == ["sanity-step0000000.json", "val-step0000002.json"]
    for record in records.values():
        assert {variant: m["episodes"] for variant, m in record["metrics"].items()} == {"id": 3, "rule_ood": 3}
