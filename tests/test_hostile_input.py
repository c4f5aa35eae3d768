"""Issue 31: hostile input is refused in one line before any expensive step. YAML limits on command-line values
and on a config file's size, ceilings on every size, bounded route readers, whole images, one-line refusals."""

from __future__ import annotations

import pytest


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


# ----------------------------------------------------------------------------------------------- items 6, 7: sizes


@pytest.fixture
def no_model(monkeypatch):
    """Any model construction fails the test: these refusals must come before the model is built."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the refusal")

    monkeypatch.setattr("lit_sftrl.training.policy.Backbone", refuse)


def test_max_new_tokens_has_a_ceiling_refused_before_the_model_is_built(no_model, alarm):
    from lit_sftrl.cli import run

    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", "configs/gp_l_ppo.yaml", "--model.init_args.sampling.max_new_tokens", "1000000000"])
    message = str(exit_info.value.code)
    assert "model.sampling.max_new_tokens: must be at most 32,768 (its ceiling), got 1,000,000,000" in message


def _llava(tmp_path, turn: str = "Colour?", image: str | None = "red.png"):
    import json

    from PIL import Image

    Image.new("RGB", (16, 12), (255, 0, 0)).save(tmp_path / "red.png")
    entries = [{"conversations": [{"from": "human", "value": "Say 1."}, {"from": "gpt", "value": "1"}]},
               {"image": image, "conversations": [{"from": "human", "value": turn}, {"from": "gpt", "value": "red"}]}]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(entries))
    return data


def _sft_fit(tmp_path, model_dir, *extra: str):
    from bench import kill_resume
    from lit_sftrl.cli import run

    config = kill_resume.write_config(tmp_path / "run", model_dir, 1, 1)
    return run(["fit", "--config", str(config), *extra])


@pytest.fixture(scope="module")
def model_dir(tiny_dir_factory):
    return tiny_dir_factory("mllama")


def test_a_long_turn_is_refused_by_its_length_before_tokenising_and_before_the_model(tmp_path, model_dir, no_model,
                                                                                     alarm):
    data = _llava(tmp_path, turn="x" * 2_000_000)  # the old code tokenised it whole during training
    with pytest.raises(SystemExit) as exit_info:
        _sft_fit(tmp_path, model_dir, "--data.init_args.llava_json", str(data))
    message = str(exit_info.value.code)
    assert f"{data}[1]: turn 0 has 2,000,000 characters, more than the limit of 100,000 (max_turn_chars)" in message


def test_an_image_file_over_its_byte_limit_is_refused(tmp_path, model_dir, no_model):
    data = _llava(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        _sft_fit(tmp_path, model_dir, "--data.init_args.llava_json", str(data),
                 "--data.init_args.max_image_bytes", "10")
    assert "(max_image_bytes)" in str(exit_info.value.code) and f"{data}[1]" in str(exit_info.value.code)


@pytest.mark.parametrize("kind", ["PNG", "JPEG"])
def test_a_truncated_image_is_refused_when_the_data_is_read_naming_file_and_sample(tmp_path, model_dir, no_model,
                                                                                   kind):
    """The header of a cut-short file reads fine; the run used to die mid-training ("image file is truncated")."""
    import numpy as np
    from PIL import Image

    whole = tmp_path / f"noise.{kind.lower()}"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(whole, kind)
    cut = tmp_path / f"cut.{kind.lower()}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    data = _llava(tmp_path, image=cut.name)
    with pytest.raises(SystemExit) as exit_info:
        _sft_fit(tmp_path, model_dir, "--data.init_args.llava_json", str(data))
    message = str(exit_info.value.code)
    assert f"{data}[1]: image {str(cut)!r} is damaged or truncated" in message, message


# ----------------------------------------------------------------------------------------------- item 4: routes


def test_milestone_info_of_unclosed_braces_is_split_in_linear_time():
    """300,000 "{" took 412 s in the old block regex; now the text is scanned once."""
    import time

    from lit_sftrl.envs.routes import RouteDataError, parse_milestone_blocks

    start = time.perf_counter()
    assert parse_milestone_blocks("{" * 300_000) == []
    assert parse_milestone_blocks('{\n"a": "' + " " * 5_000 + 'x\n}') == [{}]  # no competing whitespace runs
    with pytest.raises(RouteDataError, match="more than task.max_milestones=500"):
        parse_milestone_blocks("{}" * 200_000)  # refused at block 501, not after splitting all of them
    assert time.perf_counter() - start < 2.0


def test_a_hostile_route_file_is_refused_in_one_line_before_the_model_is_built(tmp_path, no_model, alarm):
    """Through the CLI: the route folder is read (and refused, naming the route) before any model exists."""
    import json

    from lit_sftrl.cli import run

    folder = tmp_path / "hostile"
    folder.mkdir()
    route = {"start_place": {"relocated_geocode": [40.0, -73.0]}, "route_results": {"geocode_list": [[40.0, -73.0]]},
             "milestone_info": "{}" * 1_000}
    (folder / "route_infos.json").write_text(json.dumps([[route], 1]))
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", "configs/virl_l_sft.yaml", "--data.init_args.task.routes", str(folder)])
    message = str(exit_info.value.code)
    assert "data.task.routes: route 0 milestone_info: more than task.max_milestones=500" in message, message


def test_a_small_pickle_of_shared_nested_lists_is_refused_quickly(tmp_path):
    """5 KB that stands for 200^5 values once anything walks it (the old reader expanded it to 6.5 GB)."""
    import pickle
    import time

    from lit_sftrl.envs.routes import load_pano_mapping

    value = ["pano"]
    for _ in range(5):
        value = [value] * 200
    path = tmp_path / "gps_pano_mapping.pkl"
    path.write_bytes(pickle.dumps({(40.0, -73.0): value}))
    assert path.stat().st_size < 6_000
    start = time.perf_counter()
    with pytest.raises(pickle.UnpicklingError, match="more than one place|deeper than"):
        load_pano_mapping(path)
    assert time.perf_counter() - start < 1.0
    path.write_bytes(pickle.dumps({(40.0, -73.0): "pano-1", (40.1, -73.1): "pano-2"}))
    assert load_pano_mapping(path) == {(40.0, -73.0): "pano-1", (40.1, -73.1): "pano-2"}


# ----------------------------------------------------------------------------------------------- item 9: one line


def _from_the_shell(monkeypatch, capsys, *argv: str) -> str:
    """Run ``lit-sftrl ARGV`` as the console script does; return what it printed on failure (stderr and the exit
    message), which must be short."""
    import sys

    from lit_sftrl.cli import main

    monkeypatch.setattr(sys, "argv", ["lit-sftrl", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    code = exit_info.value.code
    text = (capsys.readouterr().err + (code if isinstance(code, str) else "")).strip()
    assert "Traceback" not in text and len(text.splitlines()) <= 2, text
    return text


def test_refusals_from_the_shell_are_one_line(tmp_path, monkeypatch, capsys, tiny_dir_factory, no_model):
    import json

    assert "model.optim.lr: expected a float, got 'nan' (a finite number is needed)" in _from_the_shell(
        monkeypatch, capsys, "fit", "--config", "configs/gp_l_sft.yaml", "--model.init_args.optim.lr", "nan")

    (tmp_path / "a_file").write_text("x")
    assert "is a file: export writes a model folder" in _from_the_shell(
        monkeypatch, capsys, "export", "--ckpt", str(tmp_path / "x.ckpt"), "--out", str(tmp_path / "a_file"))

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    assert "already exists: nothing was written" in _from_the_shell(
        monkeypatch, capsys, "make-tiny", "--out", str(tmp_path / "full"))
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"

    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"image": "../../etc/passwd", "conversations": [
        {"from": "human", "value": "?"}, {"from": "gpt", "value": "!"}]}]))
    assert "points outside its folder" in _from_the_shell(
        monkeypatch, capsys, "fit", "--config", "configs/gp_l_sft.yaml", "--data.init_args.llava_json", str(data),
        "--model.init_args.backbone.path", str(tiny_dir_factory("mllama")),
        "--trainer.default_root_dir", str(tmp_path / "run"))


def test_ckpt_path_hpc_checks_the_file_it_resolves_to(tmp_path, monkeypatch, capsys, tiny_dir_factory):
    from test_security import hostile_checkpoint

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _, marker = hostile_checkpoint(run_dir, "hpc_ckpt_1.ckpt")
    text = _from_the_shell(monkeypatch, capsys, "fit", "--config", "configs/gp_l_sft.yaml", "--ckpt_path", "hpc",
                           "--model.init_args.backbone.path", str(tiny_dir_factory("mllama")),
                           "--trainer.default_root_dir", str(run_dir))
    assert "--ckpt_path hpc" in text and "could run code" in text and "hpc_ckpt_1.ckpt" in text, text
    assert not marker.exists()


def test_an_unexpected_failure_is_one_line_and_its_traceback_is_behind_verbose(tmp_path, monkeypatch, capsys):
    import sys

    from lit_sftrl.cli import main

    gguf = tmp_path / "model.gguf"  # a GGUF header and nothing else
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 20)
    argv = ["fit", "--config", "configs/gp_l_sft.yaml", "--model.init_args.backbone.path", str(gguf),
            "--trainer.default_root_dir", str(tmp_path / "run")]
    text = _from_the_shell(monkeypatch, capsys, *argv)
    assert str(gguf) in text and "--verbose" in text, text
    monkeypatch.setattr(sys, "argv", ["lit-sftrl", *argv[:-1], str(tmp_path / "second"), "--verbose"])
    with pytest.raises(Exception) as error:  # the exception itself, for its traceback
        main()
    assert not isinstance(error.value, SystemExit) and str(gguf) in str(error.value)
