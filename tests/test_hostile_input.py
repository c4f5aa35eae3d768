"""Issue 31: hostile input is refused in one line before any expensive step. YAML limits on command-line values
and on a config file's size, ceilings on every size, bounded route readers, whole images, one-line refusals."""

from __future__ import annotations

import signal

import pytest


@pytest.fixture
def alarm():
    """Fail instead of hanging: the old code took minutes (or all memory) on some of these inputs."""
    def timeout(*_):
        raise TimeoutError("hung")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def alias_bomb_value() -> str:
    """A 330-character flow mapping whose aliases stand for 10^9 values."""
    names = "abcdefghi"
    parts = ["a: &a [1,1,1,1,1,1,1,1,1,1]"]
    parts += [f"{name}: &{name} [" + ",".join([f"*{previous}"] * 10) + "]" for previous, name in zip(names, names[1:])]
    return "{" + ", ".join(parts) + "}"


# ----------------------------------------------------------------------------------------------- item 5: YAML


def test_an_alias_bomb_given_on_the_command_line_is_refused_at_once_in_one_line(alarm, capsys):
    from lit_sftrl.cli import run

    with pytest.raises(SystemExit):  # the alarm: the old code expanded it for 88 s (4 GB)
        run(["fit", "--config", "configs/gp_l_sft.yaml", "--data.init_args.task.env_kwargs", alias_bomb_value()])
    error = capsys.readouterr().err
    assert "data.task.env_kwargs: a config whose aliases expand to more than" in error, error
    assert len(error.strip().splitlines()) == 2  # the line, and where --help is


def test_a_huge_config_file_is_refused_before_it_is_read(tmp_path, alarm, capsys, monkeypatch):
    """A 3 GB (sparse) file named by --config: refused from its size, not read whole first."""
    from lit_sftrl.cli import run

    huge = tmp_path / "huge.yaml"
    with open(huge, "wb") as file:
        file.truncate(3 * 2**30)
    with pytest.raises(SystemExit):
        run(["fit", "--config", "configs/gp_l_sft.yaml", "--config", str(huge)])
    assert "3,221,225,472 bytes is refused without reading it" in capsys.readouterr().err


def test_the_run_config_read_on_resume_is_size_checked(tmp_path):
    from lit_sftrl.core.validation import MAX_YAML_CHARS, read_yaml_file

    big = tmp_path / "config.yaml"
    with open(big, "wb") as file:
        file.truncate(MAX_YAML_CHARS + 1)
    with pytest.raises(ValueError, match="is refused"):
        read_yaml_file(big)
