"""One run directory set by one key (trainer.default_root_dir), whatever the logger; a second fit into a
directory holding a run is refused unless resuming or overwriting; --trainer.logger false works."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import kill_resume


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_dir_factory) -> Path:
    """The drill config (its logger's save_dir and default_root_dir name one folder) with validation off."""
    folder = tmp_path_factory.mktemp("configs")
    return kill_resume.write_config(folder / "configured", tiny_dir_factory("mllama"), 1, 1)


def _fit(config: Path, *extra: str):
    from lit_sftrl.cli import run

    return run(["fit", "--config", str(config), *extra])


def _everything_in(root: Path, configured: Path) -> None:
    assert (root / "config.yaml").is_file() and (root / "checkpoints" / "last.ckpt").is_file()
    assert not configured.exists() or not any(configured.iterdir())


def test_default_root_dir_alone_moves_the_whole_run(config, tmp_path):
    root = tmp_path / "elsewhere"
    _fit(config, "--trainer.default_root_dir", str(root))
    _everything_in(root, config.parent / "configured")
    assert (root / "metrics.csv").is_file()


@pytest.mark.slow
def test_a_second_fit_into_a_run_directory_is_refused(config, tmp_path):
    root = tmp_path / "run"
    _fit(config, "--trainer.default_root_dir", str(root))
    before = sorted(p.name for p in root.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        _fit(config, "--trainer.default_root_dir", str(root))
    message = str(exit_info.value.code)
    assert "already holds a run" in message and "--ckpt_path last" in message and "--overwrite" in message
    assert sorted(p.name for p in root.rglob("*")) == before  # nothing written, no last-v1.ckpt
    _fit(config, "--trainer.default_root_dir", str(root), "--overwrite", "true")
    assert not (root / "checkpoints" / "last-v1.ckpt").exists()


def test_logger_false_and_tensorboard_keep_the_run_in_its_directory(config, tmp_path):
    root = tmp_path / "no_logger"
    _fit(config, "--trainer.default_root_dir", str(root), "--trainer.logger", "false",
         "--trainer.callbacks+=lightning.pytorch.callbacks.LearningRateMonitor")
    assert (root / "checkpoints" / "last.ckpt").is_file()
    pytest.importorskip("tensorboard")
    root = tmp_path / "tensorboard"
    _fit(config, "--trainer.default_root_dir", str(root),
         "--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger", "--trainer.logger.save_dir", "ignored")
    _everything_in(root, config.parent / "configured")
    assert list(root.glob("events.out.tfevents.*")) and not Path("ignored").exists()


def test_wandb_offline_keeps_the_run_in_its_directory(config, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is in the test extra; without it this logger is untested")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)  # anything written relative to the working directory would show up here
    root = tmp_path / "wandb_run"
    try:
        _fit(config, "--trainer.default_root_dir", str(root), "--trainer.logger",
             "lightning.pytorch.loggers.WandbLogger", "--trainer.logger.save_dir", "ignored",
             "--trainer.logger.offline", "true")
    finally:
        wandb.finish()
    _everything_in(root, config.parent / "configured")
    runs = list((root / "wandb").glob("offline-run-*"))
    assert runs and list(runs[0].glob("*.wandb"))  # the run's history, ready for `wandb sync`
    # (wandb's background service still keeps its own debug log under ~/.cache/wandb/logs: no run data there)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wandb_run"]
