"""Exports are all or nothing: written beside --out and renamed when complete; a directory cut short is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import kill_resume


@pytest.fixture(scope="module")
def model_dir(tiny_dir_factory) -> Path:
    return tiny_dir_factory("mllama")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model_dir) -> Path:
    from lit_sftrl.cli import run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folder = tmp_path_factory.mktemp("export")
        config = kill_resume.write_config(folder / "run", model_dir, 1, 1)
        run(["fit", "--config", str(config)])
    finally:
        torch.set_num_threads(threads)
    return folder / "run" / "checkpoints" / "last.ckpt"


def _die_half_way(monkeypatch, keep_staging: bool) -> None:
    """save_pretrained writes the config, then the process 'dies'; keep_staging: as after SIGKILL, where no
    clean-up runs."""
    from lit_sftrl.models import export

    def half(backbone, out, merge_lora=True):
        (Path(out) / "config.json").write_text(json.dumps({"model_type": "mllama"}))
        raise KeyboardInterrupt("killed")

    if hasattr(export, "save_backbone"):  # the weights writer: a function of export.py, or the Backbone's method
        monkeypatch.setattr(export, "save_backbone", half)
    else:
        from lit_sftrl.models.backbone import Backbone

        monkeypatch.setattr(Backbone, "save_pretrained", half)
    if keep_staging:
        monkeypatch.setattr(export.shutil, "rmtree", lambda *a, **k: None)


def test_an_interrupted_export_leaves_no_output(checkpoint, tmp_path, monkeypatch):
    from lit_sftrl.models.export import export_checkpoint

    out = tmp_path / "exported"
    _die_half_way(monkeypatch, keep_staging=False)
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(checkpoint, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert export_checkpoint(checkpoint, out) == out  # a second try completes
    record = json.loads((out / "lit_sftrl_export.json").read_text())
    assert record["complete"] is True and record["flops"] > 0


def test_a_killed_export_is_refused_as_incomplete(checkpoint, tmp_path, monkeypatch, model_dir):
    from lit_sftrl.cli import run
    from lit_sftrl.models.export import export_checkpoint
    from lit_sftrl.models.loading import check_model_directory

    out = tmp_path / "exported"
    _die_half_way(monkeypatch, keep_staging=True)
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(checkpoint, out)
    monkeypatch.undo()
    assert not out.exists()
    (staging,) = tmp_path.glob(".exported.tmp-*")
    with pytest.raises(ValueError, match="incomplete export") as error:
        check_model_directory(staging)
    assert str(staging) in str(error.value)
    config = kill_resume.write_config(tmp_path / "run", model_dir, 1, 1)
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", str(config), "--model.init_args.init_from", str(staging)])
    assert "incomplete export" in str(exit_info.value.code)


def test_an_export_carries_a_model_card(checkpoint, tmp_path):
    """Base model, method, task, training compute, evaluation results with standard errors, the commands."""
    import json as _json

    from lit_sftrl.models.export import export_checkpoint

    run_dir = checkpoint.parent.parent
    (run_dir / "eval").mkdir(exist_ok=True)
    (run_dir / "eval" / "val-step0000001.json").write_text(_json.dumps(
        {"stage": "val", "step": 1, "metrics": {"id": {"success": 0.25, "success_stderr": 0.1, "episodes": 16.0}}}))
    out = export_checkpoint(checkpoint, tmp_path / "carded")
    card = (out / "README.md").read_text()
    for expected in ("Base model", "SFT", "Task**: gp_l", "FLOPs", "| val | 1 | id | success | 0.250 | 0.100 |",
                     f"lit-sftrl fit --config {run_dir / 'config.yaml'}", "lit-sftrl export --ckpt"):
        assert expected in card, (expected, card)


def test_a_full_disk_during_export_is_one_line_naming_it(checkpoint, tmp_path, monkeypatch, capsys):
    import errno

    from lit_sftrl.cli import run
    from lit_sftrl.models import export

    def full(backbone, out, merge_lora=True):
        (Path(out) / "config.json").write_text("{}")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "save_backbone", full)
    out = tmp_path / "exported"
    with pytest.raises(SystemExit) as stop:
        run(["export", "--ckpt", str(checkpoint), "--out", str(out)])
    assert "no space left on device exporting to" in str(stop.value.code) and "export again" in str(stop.value.code)
    assert not out.exists() and not list(tmp_path.glob(".exported.tmp-*"))
