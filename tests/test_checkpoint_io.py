import os

import pytest
import torch

from lit_sftrl.run.checkpoint_io import AtomicCheckpointIO


def test_save_goes_through_a_temporary_file_beside_the_target(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "run" / "last.ckpt"
    io.save_checkpoint({"step": 1}, target)
    assert torch.load(target)["step"] == 1
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renames.append((src, dst)), real_replace(src, dst)))
    io.save_checkpoint({"step": 2}, target)
    (source, destination), = renames
    assert os.path.dirname(source) == str(target.parent) and destination == target
    assert torch.load(target)["step"] == 2 and sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]


def test_a_write_that_dies_leaves_the_old_checkpoint_and_no_debris(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, target)

    def die(*args, **kwargs):
        raise KeyboardInterrupt  # what a signal looks like half way through torch.save

    monkeypatch.setattr(torch, "save", die)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target)["step"] == 1 and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.mark.parametrize("failure", ["torch_zip_writer", "enospc_on_fsync"])
def test_a_full_disk_says_no_space_and_keeps_the_old_checkpoint(tmp_path, monkeypatch, failure):
    """torch's zip writer reports a full disk as "file write failed" (no errno); fsync reports ENOSPC. Either way
    the error says "no space", names the file and how to go on; the old checkpoint stays, no debris."""
    import errno
    import shutil
    from collections import namedtuple

    from lit_sftrl.core.disk import DiskFull
    from lit_sftrl.run import checkpoint_io

    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, target)
    if failure == "torch_zip_writer":
        def fail(obj, file):
            file.write(b"PK partial")
            raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                               "data/0: file write failed")

        monkeypatch.setattr(torch, "save", fail)
        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(100 * 2**20, 100 * 2**20, 0))
    else:
        def fail(fd):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(checkpoint_io.os, "fsync", fail)
    with pytest.raises(DiskFull) as error:
        io.save_checkpoint({"step": 2}, target)
    message = str(error.value)
    assert message.startswith("no space left on device writing checkpoint") and str(target) in message
    assert "--ckpt_path last" in message and "\n" not in message
    monkeypatch.undo()
    assert torch.load(target)["step"] == 1 and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_other_write_errors_pass_through_unchanged(tmp_path, monkeypatch):
    def fail(obj, file):
        raise RuntimeError("something else")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(RuntimeError, match="something else"):
        AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "last.ckpt")


@pytest.mark.parametrize("callback, last_step", [("RunCheckpoint", 5), ("ModelCheckpoint", 4)])
def test_training_that_stops_between_periodic_saves_keeps_its_last_steps(tmp_path, callback, last_step):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.demos.boring_classes import BoringModel

    from lit_sftrl.run.checkpoint_io import RunCheckpoint

    checkpoint = {"RunCheckpoint": RunCheckpoint, "ModelCheckpoint": ModelCheckpoint}[callback]
    trainer = L.Trainer(max_steps=5, callbacks=[checkpoint(dirpath=tmp_path, every_n_train_steps=2, save_last=True)],
                        logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(BoringModel())
    # Lightning's own callback loses step 5; ours keeps it.
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == last_step
