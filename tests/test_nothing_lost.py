"""Issue 31: nothing lost, whatever the user types. --overwrite deletes only a run's files, a failed checkpoint
write never turns --ckpt_path last into a restart from step 0, a resume with another config is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import kill_resume


@pytest.fixture(scope="module")
def model_dir(tiny_dir_factory) -> Path:
    return tiny_dir_factory("mllama")


def _fit(config: Path, *extra: str):
    from lit_sftrl.cli import run

    return run(["fit", "--config", str(config), *extra])


def test_overwrite_refuses_a_folder_holding_anything_but_a_run_and_deletes_nothing(tmp_path, model_dir):
    """A home-like folder (``.ssh/``, ``Documents/``) beside a previous run's files: ``--overwrite true`` is refused
    naming both, and every file is still there; the same run directory without them is overwritten."""
    root = tmp_path / "home"
    config = kill_resume.write_config(root, model_dir, 1, 1)
    _fit(config)
    (root / ".ssh").mkdir()
    (root / ".ssh" / "id_ed25519").write_text("secret")
    (root / "Documents").mkdir()
    (root / "Documents" / "thesis.tex").write_text("years of work")
    (root / "checkpoints" / "notes.txt").write_text("mine")
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        _fit(config, "--overwrite", "true")
    message = str(exit_info.value.code)
    assert ".ssh/" in message and "Documents/" in message and "checkpoints/notes.txt" in message, message
    assert "nothing was deleted" in message and "\n" not in message
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == before
    for foreign in (".ssh", "Documents", "checkpoints/notes.txt"):
        path = root / foreign
        path.unlink() if path.is_file() else __import__("shutil").rmtree(path)
    _fit(config, "--overwrite", "true")  # only a run's files left: replaced
    assert (root / "checkpoints" / "last.ckpt").is_file() and not (root / "checkpoints" / "last-v1.ckpt").exists()


def test_foreign_files_lists_what_no_run_writes(tmp_path):
    from lit_sftrl.run.run_dir import foreign_files

    (tmp_path / "checkpoints" / "fsdp.ckpt").mkdir(parents=True)
    (tmp_path / "checkpoints" / "fsdp.ckpt" / "__0_0.distcp").write_bytes(b"")
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "val-step0000001.json").write_text("{}")
    for name in ("config.yaml", "config-validate.yaml", "metrics.csv", "hparams.yaml", ".lock"):
        (tmp_path / name).write_text("")
    assert foreign_files(tmp_path) == []
    (tmp_path / "README.md").write_text("")
    (tmp_path / "eval" / "link").symlink_to(tmp_path / "README.md")
    assert foreign_files(tmp_path) == ["README.md", "eval/link"]


def test_after_a_failed_last_checkpoint_write_ckpt_path_last_resumes_from_the_newest_whole_one(
    tmp_path, model_dir, monkeypatch
):
    """The disk fills while ``last.ckpt`` is written at step 2 (``epoch=0-step=2.ckpt`` was written whole): the
    advice "resume with --ckpt_path last" then resumes from step 2, not silently from step 0."""
    from lit_sftrl.core.disk import DiskFull
    from lit_sftrl.run.checkpoint_io import AtomicCheckpointIO

    run_dir = tmp_path / "run"
    config = kill_resume.write_config(run_dir, model_dir, 3, 2)
    original = AtomicCheckpointIO.save_checkpoint

    def full_at_last(self, checkpoint, path, storage_options=None):
        if Path(path).name == "last.ckpt":
            raise DiskFull(f"no space left on device writing checkpoint {path}")
        return original(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", full_at_last)
    with pytest.raises(DiskFull):
        _fit(config)
    monkeypatch.undo()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt")) == ["epoch=0-step=2.ckpt"]
    resumed = _fit(config, "--ckpt_path", "last")
    assert resumed.trainer.global_step == 3
    steps = [int(row["step"]) for row in kill_resume.metric_rows(run_dir)]
    assert min(steps) == 2, steps  # the resumed run started at step 2, not at 0


def test_a_damaged_last_checkpoint_names_the_newest_whole_one(tmp_path, model_dir):
    run_dir = tmp_path / "run"
    config = kill_resume.write_config(run_dir, model_dir, 2, 1)
    _fit(config)
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(SystemExit) as exit_info:
        _fit(config, "--ckpt_path", "last")
    assert "--ckpt_path " + str(run_dir / "checkpoints" / "epoch=0-step=2.ckpt") in str(exit_info.value.code)


@pytest.mark.slow
def test_a_resume_under_another_config_is_refused_listing_the_keys_unless_allowed(tmp_path, model_dir):
    """``--ckpt_path last`` with another batch size and task variant used to train on and replace config.yaml.
    Now refused naming both keys; ``--allow_config_change true`` trains on and keeps the old config beside the
    new one. Training longer (``--trainer.max_steps``) is not a change of what is trained."""
    import yaml

    run_dir = tmp_path / "run"
    config = kill_resume.write_config(run_dir, model_dir, 1, 1)
    _fit(config)
    saved = (run_dir / "config.yaml").read_text()
    changed = ("--ckpt_path", "last", "--trainer.max_steps", "2", "--data.init_args.batch_size", "2",
               "--data.init_args.task.target", "12")
    with pytest.raises(SystemExit) as exit_info:
        _fit(config, *changed)
    message = str(exit_info.value.code)
    assert "data.batch_size: 1 -> 2" in message and "data.task.target" in message, message
    assert "max_steps" not in message and "--allow_config_change true" in message
    assert (run_dir / "config.yaml").read_text() == saved
    resumed = _fit(config, *changed, "--allow_config_change", "true")
    assert resumed.trainer.global_step == 2
    assert (run_dir / "config-before-resume-1.yaml").read_text() == saved
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["init_args"]["batch_size"] == 2
    assert _fit(config, "--ckpt_path", "last", "--trainer.max_steps", "3", "--data.init_args.batch_size", "2",
                "--data.init_args.task.target", "12").trainer.global_step == 3  # the new config is now the run's
