"""Small inputs cannot exhaust the machine, hang a run or reach outside their folder: YAML size and alias
expansion, image pixels (from the header), lazy cached images, tokens per sample, route data."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from bench import kill_resume

# ----------------------------------------------------------------------------------------------- YAML


def test_an_alias_bomb_is_refused_at_once(tmp_path, alarm):
    """370 bytes of nested aliases stand for 10^10 values."""
    from lit_sftrl.cli import run

    lines, previous = ["a: &a [1,1,1,1,1,1,1,1,1,1]"], "a"
    for name in "bcdefghij":
        lines.append(f"{name}: &{name} [" + ",".join([f"*{previous}"] * 10) + "]")
        previous = name
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit):
        run(["fit", "--config", "configs/gp_l_sft.yaml", "--config", str(bomb)])
    from lit_sftrl.core.validation import limited_yaml_load

    with pytest.raises(Exception, match="aliases expand"):
        limited_yaml_load(bomb.read_text())
    assert limited_yaml_load("a: &x {b: 1}\nc: *x\n") == {"a": {"b": 1}, "c": {"b": 1}}  # ordinary aliases work


def test_an_oversized_config_is_refused():
    from lit_sftrl.core.validation import MAX_YAML_CHARS, limited_yaml_load

    with pytest.raises(Exception, match="characters is refused"):
        limited_yaml_load("a: " + "x" * MAX_YAML_CHARS)


def test_an_oversized_or_exploding_config_file_is_refused_by_the_cli_in_one_line(tmp_path, capsys):
    from lit_sftrl.cli import run
    from lit_sftrl.core.validation import MAX_YAML_CHARS

    big = tmp_path / "big.yaml"
    big.write_text("seed_everything: 0\n" + "#" * MAX_YAML_CHARS + "\n")
    with pytest.raises(SystemExit):
        run(["fit", "--config", "configs/gp_l_sft.yaml", "--config", str(big)])
    assert "bytes is refused without reading it" in capsys.readouterr().err


def test_a_config_that_includes_itself_is_one_line(tmp_path):
    from lit_sftrl.cli import run

    looping = tmp_path / "self.yaml"
    looping.write_text(f"config: {looping}\n")
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", str(looping)])
    assert "includes itself" in str(exit_info.value.code) and "\n" not in str(exit_info.value.code)


# ----------------------------------------------------------------------------------------------- images


def huge_png_header(path: Path, width: int = 12000, height: int = 12000) -> Path:
    """A tiny file whose PNG header declares width x height pixels (432 MB decoded at 12000 x 12000)."""
    Image.new("RGB", (4, 4)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4: ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17: ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr: ihdr + 17])))
    path.write_bytes(bytes(data))
    return path


def _llava(tmp_path: Path, image: str) -> Path:
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"image": image, "conversations": [{"from": "human", "value": "<image>\nq"},
                                                                   {"from": "gpt", "value": "a"}]}]))
    return path


def test_image_pixels_are_checked_from_the_header_before_decoding(tmp_path, monkeypatch):
    from lit_sftrl.data.llava_data import read_llava_json

    huge_png_header(tmp_path / "huge.png")
    monkeypatch.setattr(Image.Image, "convert", lambda *a, **k: pytest.fail("decoded before the check"))
    with pytest.raises(ValueError, match=r"12000 x 12000 pixels, more than the limit") as error:
        read_llava_json(_llava(tmp_path, "huge.png"))
    assert "data.json[0]" in str(error.value)


def test_image_paths_stay_in_their_folder_and_name_regular_files(tmp_path, alarm):
    from lit_sftrl.data.llava_data import read_llava_json

    folder = tmp_path / "data"
    folder.mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "outside.png")
    with pytest.raises(ValueError, match="outside its folder"):
        read_llava_json(_llava(folder, "../outside.png"))
    (folder / "link.png").symlink_to(tmp_path / "outside.png")
    with pytest.raises(ValueError, match="outside its folder"):
        read_llava_json(_llava(folder, "link.png"))
    os.mkfifo(folder / "pipe.jpg")  # opening it would block for ever
    with pytest.raises(ValueError, match="not a regular file"):
        read_llava_json(_llava(folder, "pipe.jpg"))


def test_images_are_decoded_lazily_and_cached_by_path(tmp_path):
    import numpy as np

    from lit_sftrl.data.datamodules import LlavaSource

    Image.new("RGB", (8, 6), (255, 0, 0)).save(tmp_path / "a.png")
    path = tmp_path / "data.json"
    entry = {"image": "a.png", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    path.write_text(json.dumps([entry] * 50))
    source = LlavaSource(str(path), None)
    assert all(isinstance(c["image"], str) for c in source.conversations)  # nothing decoded yet
    batch = source.batch(np.random.default_rng(0), 4)
    assert batch[0]["image"].shape == (6, 8, 3)
    assert all(sample["image"] is batch[0]["image"] for sample in batch)  # one decoded copy


def test_the_image_pixel_limit_is_the_configs(tmp_path):
    """data.max_image_pixels reaches the LLaVA reader: a 16 x 12 image passes at 192 pixels, not at 191."""
    from lit_sftrl.data.datamodules import SFTDataModule

    Image.new("RGB", (16, 12)).save(tmp_path / "a.png")
    data = _llava(tmp_path, "a.png")
    SFTDataModule(llava_json=str(data), max_image_pixels=192).train_dataloader()
    with pytest.raises(ValueError, match=r"16 x 12 pixels, more than the limit of 191 \(max_image_pixels\)"):
        SFTDataModule(llava_json=str(data), max_image_pixels=191).train_dataloader()


# ----------------------------------------------------------------------------------------------- tokens


def test_a_sample_over_max_tokens_stops_the_run_with_a_message(tmp_path, tiny_dir_factory):
    from lit_sftrl.cli import run
    from lit_sftrl.core.validation import LimitExceeded

    config = kill_resume.write_config(tmp_path / "run", tiny_dir_factory("mllama"), 2, 2)
    with pytest.raises(LimitExceeded, match=r"tokens, more than model.backbone.max_tokens=8"):
        run(["fit", "--config", str(config), "--model.init_args.backbone.max_tokens", "8"])


# ----------------------------------------------------------------------------------------------- routes


@pytest.fixture(scope="module")
def city(tmp_path_factory) -> Path:
    from lit_sftrl.envs.city import make_city

    return make_city(tmp_path_factory.mktemp("city") / "metro", "metro", num_routes=2, seed=0, grid_size=3,
                     pano_width=256)


def _first_route(city: Path) -> dict:
    return json.loads((city / "route_infos.json").read_text())[0][0]


@pytest.mark.parametrize("field", ["nan_geocode", "inf_heading", "nan_milestone_heading", "too_many_milestones"])
def test_bad_route_numbers_are_refused(city, field):
    from lit_sftrl.envs.routes import MAX_MILESTONES, RouteDataError, parse_route

    raw = _first_route(city)
    if field == "nan_geocode":
        raw["route_results"]["geocode_list"][0] = [float("nan"), 0.0]
    elif field == "inf_heading":
        raw["init_heading"] = float("inf")
    elif field == "nan_milestone_heading":
        raw["milestone_info"] = raw["milestone_info"].replace(
            '"to_next_intersection_heading": "', '"to_next_intersection_heading": "9' + "9" * 400, 1
        )
    else:
        raw["milestone_info"] = "{\n}\n" * (MAX_MILESTONES + 1)
    with pytest.raises(RouteDataError) as error:
        parse_route(raw, 0)
    assert "route 0" in str(error.value)


def test_panorama_files_stay_in_their_folder(city, tmp_path):
    import shutil

    from lit_sftrl.envs.routes import RouteDataError, RouteFolder

    copy = tmp_path / "city"
    shutil.copytree(city, copy)
    folder = RouteFolder(copy)
    (pano, *_), = [list(folder._load_mapping()[0])]
    outside = tmp_path / "secret"
    outside.mkdir()
    shutil.copy(copy / "street_views" / f"{pano}.jpg", outside / "x.jpg")
    shutil.copy(copy / "street_views" / f"{pano}.metadata.json", outside / "x.metadata.json")
    with pytest.raises(RouteDataError, match="outside its folder"):
        folder.panorama("../../secret/x", "route 0")
    meta = copy / "street_views" / f"{pano}.metadata.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "rotation": float("nan")}))
    with pytest.raises(RouteDataError, match="rotation"):
        folder.panorama(pano, "route 0")


def test_a_fifo_named_as_a_panorama_is_refused_without_hanging(city, tmp_path, alarm):
    import shutil

    from lit_sftrl.envs.routes import RouteDataError, RouteFolder

    copy = tmp_path / "city"
    shutil.copytree(city, copy)
    folder = RouteFolder(copy)
    pano = folder._load_mapping()[0][0]
    (copy / "street_views" / f"{pano}.jpg").unlink()
    os.mkfifo(copy / "street_views" / f"{pano}.jpg")  # opening it would block for ever
    with pytest.raises(RouteDataError, match="not a regular file"):
        folder.panorama(pano, "route 0")


def test_route_limits_are_the_task_configs(city):
    """task.max_milestones and task.max_image_pixels reach the V-IRL environment: the generated city passes with
    the defaults, a route folder over either limit is refused naming the key (pixels before decoding)."""
    from lit_sftrl.data.tasks import TaskConfig
    from lit_sftrl.envs.routes import RouteDataError

    routes = json.loads((city / "route_infos.json").read_text())[0]
    longest = max(len(route["route_results"]["geocode_list"]) for route in routes)
    TaskConfig(name="virl_l", routes=str(city), max_milestones=longest).make_env("id")
    with pytest.raises(RouteDataError, match=f"more than task.max_milestones={longest - 1}"):
        TaskConfig(name="virl_l", routes=str(city), max_milestones=longest - 1).make_env("id")
    task = TaskConfig(name="virl_vl", routes=str(city), ood_routes=str(city), max_image_pixels=100)
    env = task.make_env("id")
    with pytest.raises(RouteDataError, match="more than the limit of 100 \\(max_image_pixels\\)"):
        env.reset(seed=0)
    TaskConfig(name="virl_vl", routes=str(city), ood_routes=str(city)).make_env("id").reset(seed=0)
