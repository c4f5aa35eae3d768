"""Synthetic cities written in the official V-IRL route-folder format (see ``lit_sftrl.envs.routes``).

The real street views cannot be downloaded here, so cities are generated: each has a few *districts*, square
street grids at different angles (so routes use all eight compass words), named landmarks on the sidewalks
near corners, routes of several turns that end at a landmark, and an equirectangular panorama at every
intersection and at the thirds of every block the routes use (so any rail point lies within 20 m of one).
Panoramas are ray-cast from the district's geometry: facades, sidewalks, roads and, at their true bearings,
one sign per landmark carrying its name. Everything is drawn from one ``numpy`` generator seeded by ``seed``,
files are written in a fixed order, so one seed gives the same bytes.

Local district coordinates: metres, ``+y`` along the district's ``angle`` (compass), ``+x`` 90 degrees
clockwise of it; intersections at multiples of the block size. Lattice points count in thirds of a block.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lit_sftrl.envs.city_render import STYLES, CityStyle, Landmark, render_panorama
from lit_sftrl.envs.routes import (
    MAPPING_FILE,
    ROUTES_FILE,
    VIEWS_DIR,
    bearing_deg,
    compass_word,
    haversine_m,
    offset_geocode,
)

TRAIN_STYLE, VISUAL_OOD_STYLE = "metro", "harbor"
# Written into every panorama's metadata: cities generated before the generator adopted the original reader's
# heading convention (the centre column faced ``rotation``) lack it, and ensure_city refuses them.
HEADING_CONVENTION = "column = (heading + rotation) / 360 * width"
DEFAULT_ROUTES = {TRAIN_STYLE: 1000, VISUAL_OOD_STYLE: 18}
DIRECTIONS = ((0, 1), (1, 0), (0, -1), (-1, 0))  # lattice steps along local +y, +x, -y, -x
SPATIAL = ("in front of you", "on your right", "behind you", "on your left")  # quadrants clockwise from ahead

Lattice = tuple[int, int]


@dataclass
class District:
    index: int
    origin: tuple[float, float]  # geocode of intersection (0, 0)
    angle: float  # compass heading of local +y
    size: int  # intersections per side
    block: float
    landmarks: dict[Lattice, list[Landmark]] = field(default_factory=dict)  # by intersection

    def geocode(self, x: float, y: float) -> tuple[float, float]:
        a = math.radians(self.angle)
        east, north = x * math.cos(a) + y * math.sin(a), -x * math.sin(a) + y * math.cos(a)
        lat, lng = offset_geocode(self.origin, east, north)
        return (round(lat, 7), round(lng, 7))

    def lattice_geocode(self, point: Lattice) -> tuple[float, float]:
        return self.geocode(point[0] * self.block / 3, point[1] * self.block / 3)


# ------------------------------------------------------------------------------------------- layout


def _districts(style: CityStyle, grid_size: int, count: int, rng: np.random.Generator) -> list[District]:
    """Districts 1.5 km apart; odd ones turned 45 degrees so cardinal and diagonal compass words both occur."""
    districts = []
    for index in range(count):
        jitter = float(rng.uniform(-6.0, 6.0))  # with grid_angle, stays clear of the compass-word boundaries
        angle = (style.grid_angle + 45.0 * (index % 2) + jitter) % 360.0
        origin = offset_geocode(style.origin, 1500.0 * index, 0.0)
        districts.append(District(index, origin, angle, grid_size, style.block_m))
    return districts


def _place_landmarks(district: District, style: CityStyle, names: list[str], rng: np.random.Generator) -> None:
    """Zero to two landmarks per intersection, each on the sidewalk of one corner, sign colours distinct."""
    edge = style.road_half_m + style.sidewalk_m - 1.0  # just in front of the facades
    along = style.block_m * 0.34
    for i in range(district.size):
        for j in range(district.size):
            count = int(rng.choice([0, 1, 1, 2]))
            corners = rng.permutation(4)[:count]
            colours = rng.permutation(len(style.sign_colors))[:count]
            placed = []
            for corner, colour in zip(corners, colours):
                sx, sy = (1 if corner & 1 else -1), (1 if corner & 2 else -1)
                dx, dy = (along, edge) if rng.random() < 0.5 else (edge, along)
                x, y = i * district.block + sx * dx, j * district.block + sy * dy
                placed.append(Landmark(names.pop(), x, y, int(colour)))
                if not names:  # a big city reuses names, as chains do
                    names.extend(rng.permutation(style.landmark_names).tolist())
            district.landmarks[(i, j)] = placed


def _sample_path(district: District, turns: int, rng: np.random.Generator) -> list[Lattice] | None:
    """Milestones in lattice units: start (a third of a block before an intersection), turn points, destination."""
    n = district.size
    node = (int(rng.integers(n)), int(rng.integers(n)))
    step = DIRECTIONS[int(rng.integers(4))]
    previous = (node[0] - step[0], node[1] - step[1])
    if not (0 <= previous[0] < n and 0 <= previous[1] < n):
        return None
    back = int(rng.integers(1, 3))  # thirds of a block before the first intersection
    start = (3 * node[0] - step[0] * back, 3 * node[1] - step[1] * back)
    path, visited = [start], {previous, node}
    for leg in range(turns + 1):
        if leg > 0:
            turn = DIRECTIONS.index(step) + (1 if rng.random() < 0.5 else -1)
            step = DIRECTIONS[turn % 4]
        blocks = int(rng.integers(1, 4)) if leg > 0 else int(rng.integers(0, 3))
        for _ in range(blocks):
            node = (node[0] + step[0], node[1] + step[1])
            if not (0 <= node[0] < n and 0 <= node[1] < n) or node in visited:
                return None
            visited.add(node)
        if leg > 0 and blocks == 0:
            return None
        path.append((3 * node[0], 3 * node[1]))
    return path if district.landmarks[(node[0], node[1])] else None


def _lattice_points(a: Lattice, b: Lattice) -> list[Lattice]:
    """Every lattice point on the straight street from ``a`` to ``b`` (inclusive)."""
    steps = max(abs(b[0] - a[0]), abs(b[1] - a[1]))
    return [(a[0] + (b[0] - a[0]) * k // steps, a[1] + (b[1] - a[1]) * k // steps) for k in range(steps + 1)]


def _spatial(heading: float, bearing: float) -> str:
    """Where a landmark at compass ``bearing`` is for someone facing ``heading`` (the view it shows up in)."""
    return SPATIAL[int(((bearing - heading + 45.0) % 360.0) // 90.0)]


def _route_record(district: District, path: list[Lattice], init_heading: int) -> dict:
    """One entry of route_infos.json, milestone_info written as the official brace-block text."""
    geos = [district.lattice_geocode(p) for p in path]
    blocks, mentioned = [], []
    for k in range(len(path) - 1):
        heading = int(round(bearing_deg(geos[k], geos[k + 1]))) % 360
        arrival = district.landmarks.get((path[k + 1][0] // 3, path[k + 1][1] // 3), [])
        text = "No landmark nearby"
        if arrival:
            mark = arrival[0]
            spot = district.geocode(mark.x, mark.y)
            text = f"{mark.name} is {_spatial(heading, bearing_deg(geos[k + 1], spot))}"
            mentioned.append({"name": mark.name, "geocode": list(spot)})
        meters = int(round(float(haversine_m(*geos[k], *geos[k + 1]))))
        blocks.append(
            "{\n"
            f'"intersection_idx": "{k}",\n"landmarks": "{text}",\n"distance": "{meters} meters",\n'
            f'"human_heading": "{compass_word(heading)}",\n'
            f'"to_next_intersection_heading": "{heading} ({compass_word(heading)})",\n'
            "}"
        )
    destination = mentioned.pop() if mentioned else {"name": "destination", "geocode": list(geos[-1])}
    return {
        "start_place": {"name": f"start of route in district {district.index}", "geocode": list(geos[0]),
                        "relocated_geocode": list(geos[0])},
        "init_heading": init_heading,
        "route_results": {"geocode_list": [list(g) for g in geos[1:]], "landmark_list": mentioned},
        "dest_place": destination,
        "milestone_info": "\n".join(blocks),
    }


def _sample_routes(districts: list[District], num_routes: int, turns: tuple[int, int], rng: np.random.Generator):
    """Distinct routes; returns (district index, lattice path, init heading) triples."""
    routes, seen = [], set()
    for _ in range(num_routes * 200):
        if len(routes) == num_routes:
            return routes
        district = districts[int(rng.integers(len(districts)))]
        path = _sample_path(district, int(rng.integers(turns[0], turns[1] + 1)), rng)
        if path is not None and (district.index, *path) not in seen:
            seen.add((district.index, *path))
            routes.append((district.index, path, int(rng.integers(1, 360))))
    raise ValueError(f"could not find {num_routes} distinct routes; use a larger grid_size")


# ------------------------------------------------------------------------------------------- writing


def default_grid_size(num_routes: int) -> int:
    """Intersections per district side: enough distinct routes without rendering needless panoramas."""
    return 4 if num_routes <= 50 else 6 if num_routes <= 2000 else 8


def make_city(
    out: str | Path,
    style: str,
    num_routes: int,
    seed: int,
    *,
    grid_size: int | None = None,
    districts: int = 2,
    turns: tuple[int, int] = (1, 3),
    pano_width: int = 1024,
    jpeg_quality: int = 85,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic city with ``num_routes`` routes to ``out`` and return its path.

    The folder appears atomically (written aside, then renamed): an interrupted run leaves no half folder.
    """
    if style not in STYLES:
        raise ValueError(f"style={style!r} is not valid; allowed values: {', '.join(map(repr, STYLES))}")
    if num_routes < 1 or districts < 1 or not 1 <= turns[0] <= turns[1] or pano_width < 64 or pano_width % 2:
        raise ValueError("num_routes, districts >= 1; 1 <= turns[0] <= turns[1]; pano_width even and >= 64")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; remove it, pass overwrite=True, or use ensure_city")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write_city(partial, STYLES[style], num_routes, seed, grid_size or default_grid_size(num_routes),
                    districts, turns, pano_width, jpeg_quality)
        if out.exists():
            shutil.rmtree(out)
        os.rename(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def ensure_city(out: str | Path, style: str, num_routes: int, seed: int, **options: Any) -> Path:
    """Generate the city only when ``out`` is missing (the trainer calls this on first use); ``options`` go to
    :func:`make_city`. An existing folder is kept as it is, but must hold ``num_routes`` routes."""
    out = Path(out)
    if not (out / ROUTES_FILE).is_file():
        try:
            make_city(out, style, num_routes, seed, **options)
        except FileExistsError:  # another process finished first
            pass
    count = json.loads((out / ROUTES_FILE).read_text())[1]
    sample = next((out / VIEWS_DIR).glob("*.metadata.json"), None)
    if sample is not None and json.loads(sample.read_text()).get("heading_convention") != HEADING_CONVENTION:
        raise ValueError(f"{out} was generated with an older heading convention (views would face the wrong way); "
                         "remove it to have it generated again")
    if count != num_routes:
        raise ValueError(f"{out} holds {count} routes, not {num_routes}; remove it or choose another folder")
    return out


def _write_city(folder: Path, style: CityStyle, num_routes: int, seed: int, grid_size: int, count: int,
                turns: tuple[int, int], pano_width: int, jpeg_quality: int) -> None:
    rng = np.random.default_rng(seed)
    districts = _districts(style, grid_size, count, rng)
    names = rng.permutation(style.landmark_names).tolist()
    for district in districts:
        _place_landmarks(district, style, names, rng)
    routes = _sample_routes(districts, num_routes, turns, rng)
    records = [_route_record(districts[d], path, heading) for d, path, heading in routes]
    used = sorted({(d, p) for d, path, _ in routes for a, b in zip(path, path[1:]) for p in _lattice_points(a, b)})
    (folder / VIEWS_DIR).mkdir(parents=True)
    (folder / ROUTES_FILE).write_text(json.dumps([records, len(records)], indent=1))
    signs = [[m for marks in district.landmarks.values() for m in marks] for district in districts]
    mapping = {}
    for d, point in used:
        district = districts[d]
        pano_id = f"{style.name[:3]}{seed}d{d}x{point[0]}y{point[1]}"
        rotation = round(float(rng.uniform(0.0, 360.0)), 2)  # varied, so the north offset matters
        x, y = point[0] * district.block / 3, point[1] * district.block / 3
        image = render_panorama(style, district.angle, (x, y), rotation, signs[d], pano_width, salt=seed * 31 + d)
        image.save(folder / VIEWS_DIR / f"{pano_id}.jpg", quality=jpeg_quality)
        geo = district.lattice_geocode(point)
        meta = {"pano_id": pano_id, "lat": geo[0], "lng": geo[1], "rotation": rotation,
                "heading_convention": HEADING_CONVENTION}
        (folder / VIEWS_DIR / f"{pano_id}.metadata.json").write_text(json.dumps(meta))
        mapping[geo] = pano_id
    (folder / MAPPING_FILE).write_bytes(pickle.dumps(mapping, protocol=4))


__all__ = ["STYLES", "DEFAULT_ROUTES", "TRAIN_STYLE", "VISUAL_OOD_STYLE", "make_city", "ensure_city"]
