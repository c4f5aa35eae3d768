"""Nothing runs that should not: checkpoints are read with ``weights_only=True`` only, free-form config fields
hold plain data only, model directories never run their own Python.

The hostile files here would each create a file if their code ran; every test asserts that it was not created.
"""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest
import torch

from bench import kill_resume
from lit_sftrl.models.export import UnsafeCheckpointError, check_lightning_checkpoint


class _RunsCode:
    """Unpickling this calls ``exec`` on a line that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


def hostile_checkpoint(folder: Path, name: str = "hostile.ckpt") -> tuple[Path, Path]:
    """A file that looks like a lit-sftrl checkpoint (state_dict, backbone hyper-parameters) but whose pickle
    runs code when loaded with weights_only=False. Returns (checkpoint, marker the code would create)."""
    marker = folder / f"{name}.ran"
    path = folder / name
    torch.save({"state_dict": {}, "global_step": 1,
                "hyper_parameters": {"backbone": {"path": "x"}, "extra": _RunsCode(marker)}}, path)
    return path, marker


@pytest.fixture(scope="module")
def model_dir(tiny_dir_factory) -> Path:
    return tiny_dir_factory("mllama")


def _config(tmp_path: Path, model: Path, name: str = "run") -> tuple[Path, Path]:
    run = tmp_path / name
    return run, kill_resume.write_config(run, model, 4, 2)


def test_the_hostile_file_really_runs_code_without_weights_only(tmp_path):
    """The fixture is honest: torch's full unpickler runs it."""
    path, marker = hostile_checkpoint(tmp_path)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_checkpoint_check_refuses_code_in_one_line_naming_the_file(tmp_path):
    path, marker = hostile_checkpoint(tmp_path)
    with pytest.raises(UnsafeCheckpointError) as error:
        check_lightning_checkpoint(path)
    message = str(error.value)
    assert str(path) in message and "\n" not in message and "could run code" in message and "exec" in message
    assert not marker.exists()


def test_every_entry_point_refuses_a_checkpoint_that_runs_code(tmp_path, model_dir):
    """--ckpt_path (fit and validate), --ckpt_path last, --model.init_from and export --ckpt: SystemExit with one
    line naming the file; the code never ran and nothing was exported."""
    from lit_sftrl.cli import run

    run_dir, config = _config(tmp_path, model_dir)
    path, marker = hostile_checkpoint(tmp_path)
    (run_dir / "checkpoints").mkdir(parents=True)
    last, last_marker = hostile_checkpoint(run_dir / "checkpoints", "last.ckpt")
    exported = tmp_path / "exported"
    commands = [
        ["fit", "--config", str(config), "--ckpt_path", str(path)],
        ["fit", "--config", str(config), "--model.init_args.init_from", str(path)],
        ["validate", "--config", str(config), "--ckpt_path", str(path)],
        ["test", "--config", str(config), "--ckpt_path", str(path)],
        ["export", "--ckpt", str(path), "--out", str(exported)],
    ]
    for argv in commands:
        with pytest.raises(SystemExit) as exit_info:
            run(argv)
        message = str(exit_info.value.code)
        assert str(path) in message and "could run code" in message, (argv, message)
        assert len(message.splitlines()) <= 2, message
        assert not marker.exists(), argv
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", str(config), "--ckpt_path", "last"])
    assert "last.ckpt" in str(exit_info.value.code) and not last_marker.exists()
    assert not exported.exists()


def test_weights_only_false_is_refused(tmp_path, model_dir):
    from lit_sftrl.cli import run

    _, config = _config(tmp_path, model_dir)
    with pytest.raises(SystemExit, match="weights_only"):
        run(["fit", "--config", str(config), "--weights_only", "false"])


def test_env_kwargs_class_path_is_refused_and_never_instantiated(tmp_path, model_dir):
    """A {class_path, init_args} inside the free-form env_kwargs would be instantiated by jsonargparse."""
    from lit_sftrl.cli import run

    _, config = _config(tmp_path, model_dir)
    marker = tmp_path / "instantiated.txt"
    hostile = tmp_path / "hostile.yaml"
    hostile.write_text(config.read_text().replace(
        "task: {name: gp_l}",
        f"task: {{name: gp_l, env_kwargs: {{x: {{class_path: logging.FileHandler, "
        f"init_args: {{filename: {marker}}}}}}}}}",
    ))
    assert "class_path: logging.FileHandler" in hostile.read_text()
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", str(hostile)])
    assert "env_kwargs" in str(exit_info.value.code) and "class_path" in str(exit_info.value.code)
    assert not marker.exists()


def test_env_kwargs_plain_data_still_works():
    from lit_sftrl.data.tasks import TaskConfig

    _, kwargs = TaskConfig(name="gp_l", env_kwargs={"drop_rate": 0.0, "names": ["a"], "nested": {"k": 1}}).env_spec()
    assert kwargs["drop_rate"] == 0.0 and kwargs["nested"] == {"k": 1}
    with pytest.raises(ValueError, match="env_kwargs"):
        TaskConfig(env_kwargs={"x": {"class_path": "logging.FileHandler", "init_args": {}}})
    with pytest.raises(ValueError, match="env_kwargs"):
        TaskConfig(env_kwargs={"x": object()})


def test_model_directory_with_its_own_code_is_refused(tmp_path, model_dir):
    """transformers would ask y/N (or, trusted, import the directory's Python); lit-sftrl never runs it."""
    import shutil

    from lit_sftrl.models.loading import check_model_directory

    copy = tmp_path / "remote-code"
    shutil.copytree(model_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig"}
    (copy / "config.json").write_text(json.dumps(config))
    (copy / "evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    with pytest.raises(ValueError, match="own Python code") as error:
        check_model_directory(copy)
    assert str(copy) in str(error.value)
    assert not (tmp_path / "ran").exists()


def test_every_from_pretrained_call_pins_trust_remote_code():
    """A static guard over the package: every transformers loader call says trust_remote_code=False."""
    import re

    package = Path(__file__).resolve().parents[1] / "lit_sftrl"
    unpinned = []
    for file in package.rglob("*.py"):
        text = file.read_text()
        for match in re.finditer(r"\.from_pretrained\(", text):
            call = text[match.end(): text.find("\n", match.end()) + 200]
            depth, end = 1, 0
            for end, char in enumerate(call):
                depth += {"(": 1, ")": -1}.get(char, 0)
                if depth == 0:
                    break
            pinned_in_kwargs = (
                "**" in call[:end] and '"trust_remote_code": False' in text[max(0, match.start() - 400): match.start()]
            )
            if "trust_remote_code=False" not in call[:end] and not pinned_in_kwargs:
                unpinned.append(f"{file.name}: {text[match.start() - 40: match.end() + 40]!r}")
    assert not unpinned, unpinned
