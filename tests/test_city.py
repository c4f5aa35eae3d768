"""Synthetic city generator: official format, determinism, atomic writes, landmarks at their true bearings."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from lit_sftrl.envs.city import DEFAULT_ROUTES, SPATIAL, STYLES, TRAIN_STYLE, VISUAL_OOD_STYLE, ensure_city, make_city
from lit_sftrl.envs.city_render import Landmark, render_panorama
from lit_sftrl.envs.routes import (
    COMPASS,
    RouteFolder,
    bearing_deg,
    load_pano_mapping,
    offset_geocode,
    parse_milestone_blocks,
    read_routes,
)


@pytest.fixture(scope="module")
def harbor(tmp_path_factory) -> Path:
    return make_city(tmp_path_factory.mktemp("city") / "harbor", "harbor", num_routes=8, seed=5, grid_size=4,
                     pano_width=512)


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def sign_pixels(view: np.ndarray, colour: tuple[int, int, int], tolerance: int = 40) -> int:
    return int((np.abs(view.astype(int) - colour).max(axis=-1) < tolerance).sum())


def test_official_format(harbor):
    data = json.loads((harbor / "route_infos.json").read_text())
    routes, count = data
    assert count == len(routes) == 8
    for route in routes:
        blocks = parse_milestone_blocks(route["milestone_info"])
        assert len(blocks) == len(route["route_results"]["geocode_list"]) >= 2
        assert set(blocks[0]) == {"intersection_idx", "landmarks", "distance", "human_heading",
                                  "to_next_intersection_heading"}
        assert blocks[-1]["landmarks"].startswith(route["dest_place"]["name"] + " is ")
        assert len(route["start_place"]["relocated_geocode"]) == 2 and 0 < route["init_heading"] < 360
    assert len(read_routes(harbor / "route_infos.json")) == 8
    mapping = load_pano_mapping(harbor / "gps_pano_mapping.pkl")
    rotations = []
    for pano in mapping.values():
        assert (harbor / "street_views" / f"{pano}.jpg").is_file()
        rotations.append(json.loads((harbor / "street_views" / f"{pano}.metadata.json").read_text())["rotation"])
    assert np.std(rotations) > 60  # north offsets vary, so the loader's rotation handling matters
    assert {p.name for p in harbor.iterdir()} == {"route_infos.json", "gps_pano_mapping.pkl", "street_views"}


def test_routes_use_cardinal_and_diagonal_headings(tmp_path):
    folder = make_city(tmp_path / "c", TRAIN_STYLE, num_routes=12, seed=1, grid_size=3, pano_width=64)
    words = {m.compass for r in read_routes(folder / "route_infos.json") for m in r.milestones}
    assert words & set(COMPASS[0::2]) and words & set(COMPASS[1::2])


def test_generation_is_deterministic(tmp_path):
    kwargs = dict(style=TRAIN_STYLE, num_routes=3, grid_size=3, pano_width=128)
    first = digest(make_city(tmp_path / "a", seed=7, **kwargs))
    assert first == digest(make_city(tmp_path / "b", seed=7, **kwargs))
    assert first != digest(make_city(tmp_path / "c", seed=8, **kwargs))


def test_landmark_appears_in_the_view_facing_its_bearing(tmp_path):
    """Render one sign, store it as a route folder with a north offset, cut views through the loader."""
    style = STYLES[TRAIN_STYLE]
    colour = style.sign_colors[2]
    (tmp_path / "street_views").mkdir()
    here = (40.0, -73.0)
    milestone = '{\n"landmarks": "No landmark nearby",\n"to_next_intersection_heading": "0 (north)",\n}'
    route = {"start_place": {"relocated_geocode": here}, "route_results": {"geocode_list": [here]},
             "milestone_info": milestone}
    (tmp_path / "route_infos.json").write_text(json.dumps([[route], 1]))
    (tmp_path / "gps_pano_mapping.pkl").write_bytes(pickle.dumps({here: "p"}))
    rng = np.random.default_rng(0)
    for trial in range(4):
        angle, rotation = float(rng.uniform(0, 360)), float(rng.uniform(0, 360))
        mark = Landmark("Chase Bank", *((27.2, 10.0), (-10.0, 27.2), (-27.2, -10.0), (10.0, -27.2))[trial], 2)
        bearing = angle + np.degrees(np.arctan2(mark.x, mark.y))
        render_panorama(style, angle, (0.0, 0.0), rotation, [mark], 1024, salt=trial).save(
            tmp_path / "street_views" / "p.jpg", quality=85)
        (tmp_path / "street_views" / "p.metadata.json").write_text(json.dumps({"rotation": rotation}))
        folder = RouteFolder(tmp_path)
        facing = sign_pixels(folder.views(here, [bearing], 224, "test")[0], colour)
        assert facing > 300
        for turn in (90, 180, 270):
            assert sign_pixels(folder.views(here, [bearing + turn], 224, "test")[0], colour) < 5


def test_milestone_words_match_geometry_and_views(harbor):
    folder = RouteFolder(harbor)
    palette = STYLES[VISUAL_OOD_STYLE].sign_colors
    raw_routes = json.loads((harbor / "route_infos.json").read_text())[0]
    for raw, route in zip(raw_routes, folder.routes):
        marks = raw["route_results"]["landmark_list"] + [raw["dest_place"]]
        mentioned = [m for m in route.milestones if m.landmarks != "No landmark nearby"]
        assert len(mentioned) == len(marks)
        arrivals = [g for g, m in zip(route.geocodes, route.milestones) if m.landmarks != "No landmark nearby"]
        for milestone, mark, spot in zip(mentioned, marks, arrivals):
            bearing = bearing_deg(spot, tuple(mark["geocode"]))
            quadrant = int(((bearing - milestone.heading + 45) % 360) // 90)
            assert milestone.landmarks == f"{mark['name']} is {SPATIAL[quadrant]}"
            view = folder.views(spot, [bearing], 224, "test")[0][:, 56:168]  # the sign stands at the centre
            assert max(sign_pixels(view, c) for c in palette) > 150


def test_styles_are_distinct():
    assert {TRAIN_STYLE, VISUAL_OOD_STYLE} <= set(STYLES) and DEFAULT_ROUTES == {"metro": 1000, "harbor": 18}
    metro, harbor = STYLES[TRAIN_STYLE], STYLES[VISUAL_OOD_STYLE]
    assert not set(metro.landmark_names) & set(harbor.landmark_names)
    assert not set(metro.facades) & set(harbor.facades) and metro.sky != harbor.sky
    for style in STYLES.values():
        assert len(set(style.landmark_names)) == len(style.landmark_names)
        assert all(len(word) <= 10 for name in style.landmark_names for word in name.split())


def test_make_city_checks_and_ensure_city(tmp_path):
    with pytest.raises(ValueError, match="style='paris'.*'metro'"):
        make_city(tmp_path / "x", "paris", 2, 0)
    out = tmp_path / "virl" / "harbor"
    assert ensure_city(out, "harbor", 2, 0, pano_width=64) == out
    stamp = (out / "route_infos.json").stat().st_mtime_ns
    assert ensure_city(out, "harbor", 2, 0) == out and (out / "route_infos.json").stat().st_mtime_ns == stamp
    assert [p.name for p in out.parent.iterdir()] == ["harbor"]  # nothing partial left behind
    with pytest.raises(ValueError, match="holds 2 routes, not 5"):
        ensure_city(out, "harbor", 5, 0)
    with pytest.raises(FileExistsError):
        make_city(out, "harbor", 2, 0)
    make_city(out, "harbor", 3, 0, overwrite=True, pano_width=64)
    assert json.loads((out / "route_infos.json").read_text())[1] == 3
    for meta in (out / "street_views").glob("*.metadata.json"):  # as generated before the heading convention
        meta.write_text(json.dumps(
            {key: v for key, v in json.loads(meta.read_text()).items() if key != "heading_convention"}
        ))
    with pytest.raises(ValueError, match="older heading convention"):
        ensure_city(out, "harbor", 3, 0)


def test_offset_geocode_round_trip():
    origin = (40.75, -73.98)
    east = offset_geocode(origin, 100.0, 0.0)
    assert abs(bearing_deg(origin, east) - 90) < 0.1
