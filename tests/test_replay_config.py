"""A run's saved config.yaml (and --print_config output) can be fed back: LightningCLI saves it for that."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import kill_resume


def test_saved_config_replays(tmp_path, tiny_dir_factory, capsys):
    from lit_sftrl.cli import run
    from lit_sftrl.run.checkpoint_io import AtomicCheckpointIO

    run_dir = tmp_path / "run"
    config = kill_resume.write_config(run_dir, tiny_dir_factory("mllama"), 1, 1)
    cli = run(["fit", "--config", str(config)])
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)  # kills never leave half a file
    saved = (run_dir / "config.yaml").read_text()
    assert "Unable to serialize" not in saved
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", str(run_dir / "config.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "Unable to serialize" not in printed and "plugins: null" in printed
    replayed = run(["fit", "--config", str(run_dir / "config.yaml"), "--trainer.max_steps", "2", "--ckpt_path", "last"])
    assert replayed.trainer.global_step == 2


REPO = Path(__file__).resolve().parents[1]
TOOL_CONFIGS = {"pretrain_base", "pretrain_rules"}  # the pretrain tool's, run in tests/test_pretrain.py
CONFIGS = sorted(path for path in (REPO / "configs").glob("*.yaml") if path.stem not in TOOL_CONFIGS)


@pytest.mark.parametrize("config", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_every_printed_config_parses_back(config, tmp_path, capsys, monkeypatch):
    """print_config -> the printed file -> print_config again gives the same config (a fit from the printed file
    is then the run the original describes; test_saved_config_replays runs one)."""
    from lit_sftrl.cli import run

    monkeypatch.chdir(REPO)
    printed = []
    for source in (config, tmp_path / "printed.yaml"):
        with pytest.raises(SystemExit) as exit_info:
            run(["fit", "--config", str(source), "--print_config"])
        assert exit_info.value.code in (0, None), f"{source} does not parse"
        printed.append(capsys.readouterr().out)
        (tmp_path / "printed.yaml").write_text(printed[-1])
    assert "Unable to serialize" not in printed[0]
    assert printed[1] == printed[0]
