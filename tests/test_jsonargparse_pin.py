"""Why ``jsonargparse`` is pinned below 4.49 (pyproject.toml): from 4.49 on, what Lightning 2.6's CLI calls
(``add_instantiator``, ``instantiate_classes``, ``skip_none``) prints deprecation warnings on every run's console.
This test runs the command as a user does and fails on a jsonargparse version that does so: lift the pin when
Lightning moves to the new API and this test passes with the newer version."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_console_shows_no_deprecation_warning_of_the_cli_stack(tmp_path):
    # A fit that parses, instantiates the parser's classes' instantiators and stops at the project's config check
    # (nothing is built), and a tool that parses and instantiates: every jsonargparse call the commands make.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "default"}
    commands = [
        ["fit", "--config", "configs/gp_l_sft.yaml", "--model.backbone.path", str(tmp_path / "missing"),
         "--trainer.default_root_dir", str(tmp_path / "run")],
        ["make-city", "--style", "harbor", "--routes", "1", "--out", str(tmp_path / "city")],
    ]
    for command in commands:
        result = subprocess.run([sys.executable, "-m", "lit_sftrl.cli", *command], capture_output=True, text=True,
                                cwd=REPO, env=env, timeout=300)
        noisy = [line for line in result.stderr.splitlines()
                 if "deprecat" in line.lower() and ("jsonargparse" in line.lower() or "lightning" in line.lower()
                                                   or "was deprecated in v4" in line)]
        assert not noisy, "\n".join(noisy)
        assert "JsonargparseDeprecationWarning" not in result.stderr
