import os

import pytest
import torch

from lit_sftrl.checkpoint_io import AtomicCheckpointIO


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

