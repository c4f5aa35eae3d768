"""The tools' command lines are their functions' signatures, parsed by jsonargparse like fit's: ``--print_config``
then ``--config`` of the printed file runs the same command; every option is documented; registering a new tool
(a plain function) takes one line."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Literal

import pytest
import yaml

from lit_sftrl.cli import registered_tools, run, tool_parser


def printed_config(capsys, argv: list[str], out: Path) -> Path:
    capsys.readouterr()  # what ran before
    with pytest.raises(SystemExit) as exit_info:
        run([*argv, "--print_config"])
    assert exit_info.value.code in (0, None)
    out.write_text(capsys.readouterr().out)
    return out


def test_print_config_then_config_reproduces_the_run(tmp_path, capsys):
    flags = run(["make-city", "--style", "harbor", "--routes", "2", "--seed", "3", "--out", str(tmp_path / "a")])
    printed = printed_config(capsys, ["make-city", "--style", "harbor", "--routes", "2", "--seed", "3", "--out",
                                      str(tmp_path / "b")], tmp_path / "city.yaml")
    assert yaml.safe_load(printed.read_text()) == {"style": "harbor", "routes": 2, "seed": 3,
                                                   "out": str(tmp_path / "b")}
    from_file = run(["make-city", "--config", str(printed)])
    assert from_file == tmp_path / "b"
    files = sorted(p.relative_to(flags) for p in flags.rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(from_file) for p in from_file.rglob("*") if p.is_file())
    assert all((flags / f).read_bytes() == (from_file / f).read_bytes() for f in files)


@pytest.mark.parametrize("name", ["make-tiny", "pretrain", "make-city", "export", "report"])
def test_every_tool_prints_a_config_that_parses_back(name, tmp_path, capsys):
    required = {"make-tiny": ["--out", "m"], "pretrain": [], "make-city": ["--style", "metro", "--routes", "1",
                "--out", "c"], "export": ["--ckpt", "x.ckpt", "--out", "e"], "report": ["r1", "r2", "--out", "o"]}
    printed = printed_config(capsys, [name, *required[name]], tmp_path / "printed.yaml")
    parser = tool_parser(name, registered_tools()[name])
    again = parser.parse_args(["--config", str(printed)])
    again.pop("config")
    assert yaml.safe_load(parser.dump(again)) == yaml.safe_load(printed.read_text())


@pytest.mark.parametrize("name", ["make-tiny", "pretrain", "make-city", "export", "report"])
def test_every_option_of_every_tool_is_documented(name):
    from docstring_parser import parse

    function = registered_tools()[name]
    documented = {p.arg_name for p in parse(inspect.getdoc(function)).params}
    assert set(inspect.signature(function).parameters) <= documented
    assert parse(inspect.getdoc(function)).short_description, "the first line is the command's help"


def test_a_new_tool_is_a_function_and_one_line(tmp_path, monkeypatch):
    """What another command (say ``study``) needs: a typed, documented function, and its line in the registry."""
    import lit_sftrl.cli as cli

    def study(task: Literal["gp_l", "virl_l"], out: Path, updates: int = 20) -> Path:
        """Run the study.

        Args:
            task: the task.
            out: where to write.
            updates: PPO updates.
        """
        return out / f"{task}-{updates}"

    registered = cli.registered_tools()
    monkeypatch.setattr(cli, "registered_tools", lambda: {**registered, "study": study})
    assert run(["study", "--task", "virl_l", "--out", str(tmp_path)]) == tmp_path / "virl_l-20"
    with pytest.raises(SystemExit):
        run(["study", "--task", "gp_vl", "--out", str(tmp_path)])


def test_a_bool_option_takes_a_value_as_every_other_setting(tmp_path, capsys):
    parser = tool_parser("export", registered_tools()["export"])
    assert parser.parse_args(["--ckpt", "a", "--out", "b", "--adapter_only", "true"]).adapter_only is True
    with pytest.raises(SystemExit):
        run(["export", "--ckpt", "a", "--out", "b", "--adapter-only"])
    assert "did you mean --adapter_only?" in capsys.readouterr().err
