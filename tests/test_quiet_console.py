"""The console of a fit holds nothing a user cannot act on (as a user sees it: a separate process)."""

from __future__ import annotations

import subprocess

from bench import kill_resume

NOISE = ("Seed set to", "GPU available", "TPU available", "litlogger", "Loading weights", "_pytree",
         "Unable to serialize", "Traceback")


def test_a_fit_console_has_no_noise(tmp_path, tiny_dir_factory):
    config = kill_resume.write_config(tmp_path / "run", tiny_dir_factory("mllama"), 1, 1)
    result = subprocess.run([kill_resume.lit_sftrl_bin(), "fit", "--config", str(config)],
                            env={**kill_resume.child_env(), "PYTHONWARNINGS": "default"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    console = result.stdout + result.stderr
    assert not [noise for noise in NOISE if noise in console], console[-3000:]
