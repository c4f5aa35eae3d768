"""Route folders in the official V-IRL on-disk format, and the street views cut from their panoramas.

A route folder (the released ``nyc_1k_routes/`` and ``VLN_mini/``, or one written by ``lit_sftrl.envs.city``):

    route_infos.json           [routes, n]; each route has start_place.relocated_geocode, optional init_heading,
                               route_results.geocode_list (intersections, destination last), dest_place and
                               milestone_info (brace blocks of '"key": "value",' lines, one per milestone)
    gps_pano_mapping.pkl       pickled dict (lat, lng) -> panorama id
    street_views/<pano>.jpg    equirectangular panorama (360 x 180 degrees)
    street_views/<pano>.metadata.json   {"rotation": <the panorama's north offset in degrees>, ...}

Conventions: headings are compass degrees (0 = north, clockwise). Compass heading ``h`` lies at column
``((h + rotation) mod 360) / 360 * W`` of a panorama ``W`` pixels wide, so its centre column faces
``180 - rotation``: the original code's reader, which the released panoramas and their ``rotation`` values were
used with. The synthetic city generator writes its panoramas by the same rule. Nothing here touches the
network: a missing panorama is an error (a forward() rail point with none within 20 m is left off the rail).
"""

from __future__ import annotations

import builtins
import json
import math
import pickle
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lit_sftrl.envs.images import MAX_IMAGE_PIXELS, check_image_header, confined_file

EARTH_RADIUS_M = 6_371_008.8
SNAP_RADIUS_M = 20.0
COMPASS = ("north", "northeast", "east", "southeast", "south", "southwest", "west", "northwest")
NO_LANDMARK = "No landmark nearby"
ROUTES_FILE = "route_infos.json"
MAPPING_FILE = "gps_pano_mapping.pkl"
VIEWS_DIR = "street_views"
MAX_MILESTONES = 500  # per route; the official routes have fewer than 30 (10,000 blocks exhausted memory)
MAX_FILE_BYTES = 256 << 20  # route_infos.json and the pano mapping, checked (os.stat) before either is read
MAX_LINE_CHARS = 10_000  # one line of a milestone block; the official ones are under 300

Geocode = tuple[float, float]


class RouteDataError(ValueError):
    """A route folder's content does not follow the official format."""


# ----------------------------------------------------------------------------------------------- geometry


def wrap_degrees(delta: float) -> float:
    """Wrap an angle difference into (-180, 180] (so 350 -> 20 is +30, not -330)."""
    wrapped = (delta + 180.0) % 360.0 - 180.0
    return 180.0 if wrapped == -180.0 else wrapped


def compass_word(heading: float) -> str:
    """The nearest of the eight compass words."""
    return COMPASS[int(((heading % 360.0) + 22.5) // 45.0) % 8]


def haversine_m(lat1: Any, lng1: Any, lat2: Any, lng2: Any) -> Any:
    """Great-circle distance in metres; broadcasts over numpy arrays."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dp, dl = p2 - p1, np.radians(np.asarray(lng2) - np.asarray(lng1))
    a = np.sin(dp / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def bearing_deg(origin: Geocode, target: Geocode) -> float:
    """Initial great-circle compass bearing from ``origin`` to ``target``, in [0, 360)."""
    p1, p2 = math.radians(origin[0]), math.radians(target[0])
    dl = math.radians(target[1] - origin[1])
    x = math.sin(dl) * math.cos(p2)
    y = math.cos(p1) * math.sin(p2) - math.sin(p1) * math.cos(p2) * math.cos(dl)
    return math.degrees(math.atan2(x, y)) % 360.0


def interpolate(a: Geocode, b: Geocode, fraction: float) -> Geocode:
    """Point at ``fraction`` of the way from ``a`` to ``b`` (linear in lat/lng: exact enough within a city)."""
    return (a[0] + (b[0] - a[0]) * fraction, a[1] + (b[1] - a[1]) * fraction)


def offset_geocode(origin: Geocode, east_m: float, north_m: float) -> Geocode:
    """The point ``east_m``/``north_m`` metres from ``origin`` (local equirectangular approximation)."""
    lat = origin[0] + math.degrees(north_m / EARTH_RADIUS_M)
    lng = origin[1] + math.degrees(east_m / (EARTH_RADIUS_M * math.cos(math.radians(origin[0]))))
    return (lat, lng)


# ------------------------------------------------------------------------------------------ route records

# Applied to stripped text with fullmatch, so that no two whitespace runs compete for the same characters: each
# runs in linear time on any input. (The brace blocks were split by the regex \{(.*?)\}, which takes quadratic
# time on a text of unclosed braces: 300,000 of them took 412 s.)
_LINE = re.compile(r'"(?P<key>[^"]+)"\s*:\s*"(?P<value>.*)"')
_HEADING = re.compile(r"(-?\d+(?:\.\d+)?)(?:\s*\(\s*([a-z]+)\s*\))?", re.IGNORECASE)


@dataclass(frozen=True)
class Milestone:
    """One brace block of ``milestone_info``: what is seen on arrival and where to head next."""

    landmarks: str  # observed at the end of this milestone's segment, e.g. "Starbucks is on your right"
    heading: float  # compass degrees towards the next point
    compass: str  # the heading's compass word (as written in the data)
    distance: str


@dataclass(frozen=True)
class Route:
    index: int
    start: Geocode
    init_heading: float | None  # None: draw one at random (the official data writes 0 for that)
    geocodes: tuple[Geocode, ...]  # intersections, destination last
    milestones: tuple[Milestone, ...]  # start + each intersection before the destination
    destination: str


def parse_milestone_blocks(text: str, max_blocks: int = MAX_MILESTONES, where: str = "milestone_info") -> list[
        dict[str, str]]:
    """Split ``milestone_info`` into one ``{key: value}`` dict per brace block (a block runs from a ``{`` to the
    next ``}``), refusing more than ``max_blocks`` blocks as soon as there are, and any line over
    :data:`MAX_LINE_CHARS`, before it is parsed."""
    blocks, start = [], 0
    while (opening := text.find("{", start)) >= 0 and (closing := text.find("}", opening + 1)) >= 0:
        if len(blocks) == max_blocks:
            raise RouteDataError(f"{where}: more than task.max_milestones={max_blocks} milestone blocks")
        fields = {}
        for line in text[opening + 1 : closing].splitlines():
            if len(line) > MAX_LINE_CHARS:
                raise RouteDataError(f"{where}: a line of {len(line):,} characters (the limit is {MAX_LINE_CHARS:,})")
            line = line.strip()
            match = _LINE.fullmatch(line[:-1].rstrip() if line.endswith(",") else line)
            if match:
                fields[match.group("key").strip()] = match.group("value").strip()
        blocks.append(fields)
        start = closing + 1
    return blocks


def _parse_milestone(fields: dict[str, str], where: str) -> Milestone:
    raw = fields.get("to_next_intersection_heading")
    match = _HEADING.fullmatch((raw or "").strip())
    if match is None:
        raise RouteDataError(f"{where}: to_next_intersection_heading {raw!r} is not like '177 (south)'")
    heading = _finite(float(match.group(1)), f"{where} to_next_intersection_heading") % 360.0
    word = (match.group(2) or compass_word(heading)).lower()
    if word not in COMPASS:
        raise RouteDataError(f"{where}: compass word {word!r} is not one of {', '.join(COMPASS)}")
    landmarks = fields.get("landmarks") or NO_LANDMARK
    return Milestone(landmarks, heading, word, fields.get("distance", ""))


def _finite(value: float, where: str) -> float:
    if not math.isfinite(value):
        raise RouteDataError(f"{where}: {value!r} is not a finite number")
    return value


def _geocode(value: Any, where: str) -> Geocode:
    # NaN would snap to the first panorama and produce wrong instructions without a word: refused, as are
    # infinities and points off the globe.
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)
            and all(math.isfinite(v) for v in value) and abs(value[0]) <= 90 and abs(value[1]) <= 180):
        raise RouteDataError(f"{where}: expected [lat, lng] (finite degrees), got {value!r}")
    return (float(value[0]), float(value[1]))


def parse_route(raw: Any, index: int, max_milestones: int = MAX_MILESTONES) -> Route:
    """Validate one entry of ``route_infos.json``; errors name the route and the field."""
    where = f"route {index}"
    try:
        start = _geocode(raw["start_place"]["relocated_geocode"], f"{where} start_place.relocated_geocode")
        geocodes = tuple(
            _geocode(g, f"{where} geocode_list[{i}]") for i, g in enumerate(raw["route_results"]["geocode_list"])
        )
        blocks = parse_milestone_blocks(raw["milestone_info"], max_milestones, f"{where} milestone_info")
        init = _finite(float(raw.get("init_heading") or 0.0), f"{where} init_heading")  # 0/missing: random
        destination = str((raw.get("dest_place") or {}).get("name", "the destination"))
    except RouteDataError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError) as error:
        raise RouteDataError(f"{where}: missing or malformed field ({type(error).__name__}: {error})") from None
    if not geocodes or len(blocks) != len(geocodes):
        raise RouteDataError(
            f"{where}: {len(blocks)} milestone blocks for {len(geocodes)} geocodes; expected one per geocode"
        )
    milestones = tuple(_parse_milestone(b, f"{where} milestone {i}") for i, b in enumerate(blocks))
    return Route(index, start, init % 360.0 if init else None, geocodes, milestones, destination)


def check_file_size(path: Path, limit: int = MAX_FILE_BYTES) -> None:
    """Refuse a route-folder file over ``limit`` bytes before reading it."""
    size = path.stat().st_size
    if size > limit:
        raise RouteDataError(f"{path}: {size:,} bytes, more than the limit of {limit:,}")


def read_routes(path: Path, max_milestones: int = MAX_MILESTONES) -> tuple[Route, ...]:
    try:
        check_file_size(path)
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise RouteDataError(f"cannot read {path}: {error}") from None
    if not (isinstance(data, list) and data and isinstance(data[0], list)):
        raise RouteDataError(f"{path}: expected a JSON array [routes, n]")
    if not data[0]:
        raise RouteDataError(f"{path}: holds no routes")
    return tuple(parse_route(raw, i, max_milestones) for i, raw in enumerate(data[0]))


# ------------------------------------------------------------------------------------------- pano mapping


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain data only: a downloaded pickle must not be able to run code, nor stand for more data than it
    holds. Besides the allowed types, :meth:`load` refuses a result nested deeper than ``max_depth``, with more than
    ``max_items`` values, or in which one list, dict or tuple is reached twice: pickle's memo lets a 5 KB file
    refer to one list from 200 places, five levels deep, which anything that walks the result (``str``, a
    comparison, a copy) expands to gigabytes."""

    ALLOWED = frozenset({"dict", "tuple", "list", "float", "int", "str"})

    def __init__(self, file: Any, max_depth: int = 3, max_items: int = 10_000_000) -> None:
        super().__init__(file)
        self.max_depth, self.max_items = max_depth, max_items

    def find_class(self, module: str, name: str) -> Any:
        if module == "builtins" and name in self.ALLOWED:
            return getattr(builtins, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: the pano mapping may only hold dict, tuple, list, float, int and str"
        )

    def load(self) -> Any:
        data = super().load()
        self._check_tree(data)
        return data

    def _check_tree(self, root: Any) -> None:
        """Walk the result once (each container is visited at most once, so this is linear in the file)."""
        seen: set[int] = set()
        stack, items = [(root, 0)], 0
        while stack:
            node, depth = stack.pop()
            items += 1
            if items > self.max_items:
                raise pickle.UnpicklingError(f"holds more than {self.max_items:,} values")
            if not isinstance(node, (list, tuple, dict)):
                continue
            if depth >= self.max_depth:
                raise pickle.UnpicklingError(f"nests containers deeper than {self.max_depth} levels")
            if id(node) in seen:
                raise pickle.UnpicklingError(f"refers to one {type(node).__name__} from more than one place")
            seen.add(id(node))
            children = [v for pair in node.items() for v in pair] if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)


def load_pano_mapping(path: Path) -> dict[Geocode, str]:
    """Read ``gps_pano_mapping.pkl`` (its size checked first) with :class:`RestrictedUnpickler` and check its
    shape: ``{(lat, lng): panorama id}``."""
    if not path.is_file():
        raise FileNotFoundError(f"pano mapping {path} is missing (image modality needs it)")
    check_file_size(path)
    with path.open("rb") as handle:
        try:
            data = RestrictedUnpickler(handle).load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError) as error:
            raise pickle.UnpicklingError(f"{path}: {error or type(error).__name__}") from None
    if not isinstance(data, dict):
        raise RouteDataError(f"{path}: expected a dict (lat, lng) -> panorama id, got {type(data).__name__}")
    mapping = {}
    for key, value in data.items():
        if not isinstance(value, str):
            raise RouteDataError(f"{path}: panorama ids must be strings, got a {type(value).__name__}")
        mapping[_geocode(key, f"{path} key")] = value
    return mapping


# ------------------------------------------------------------------------------------------ perspective


@lru_cache(maxsize=32)
def _sampling_grid(size: int, fov: float, width: int, height: int) -> tuple[np.ndarray, ...]:
    """For a level pinhole camera facing the panorama's centre: each pixel's column (float, before the heading
    shift), its two source row offsets in the flattened panorama, and the vertical blend weight."""
    focal = (size / 2) / math.tan(math.radians(fov) / 2)
    coords = np.arange(size, dtype=np.float64) - (size - 1) / 2
    x, y = np.meshgrid(coords, coords)
    lon = np.arctan2(x, focal)
    lat = np.arctan2(-y, np.hypot(x, focal))
    u = (lon / (2 * math.pi) + 0.5) * width - 0.5
    v = np.clip((0.5 - lat / math.pi) * height - 0.5, 0, height - 1)
    v0 = np.floor(v)
    row0 = v0.astype(np.int64) * width
    row1 = np.minimum(v0.astype(np.int64) + 1, height - 1) * width
    return u.astype(np.float32), row0, row1, (v - v0).astype(np.float32)[..., None]


def perspective_view(pano: np.ndarray, rotation: float, heading: float, size: int, fov: float = 90.0) -> np.ndarray:
    """Cut a ``size`` x ``size`` pinhole view facing compass ``heading`` from an equirectangular panorama.

    A view as fine as the panorama is sampled bilinearly. A coarser one is sampled at ``factor`` times its size
    (nearest pixel) and box-averaged down: cheaper than bilinear, and thin text strokes do not alias away.
    """
    height, width = pano.shape[:2]
    pano_px_per_rad = width / (2 * math.pi)
    view_px_per_rad = (size / 2) / math.tan(math.radians(fov) / 2)
    factor = max(1, min(4, int(pano_px_per_rad / view_px_per_rad)))
    u, row0, row1, fv = _sampling_grid(size * factor, float(fov), width, height)
    # Heading h at column (h + rotation) / 360 * W; the grid's own centre column is W / 2.
    u = u + np.float32(((heading + rotation) / 360.0 - 0.5) % 1.0 * width)
    flat = pano.reshape(-1, pano.shape[2])
    if factor > 1:
        nearest = flat[np.where(fv[..., 0] < 0.5, row0, row1) + np.rint(u).astype(np.int64) % width]
        total = sum(nearest[i::factor, j::factor].astype(np.uint16) for i in range(factor) for j in range(factor))
        return ((total + factor * factor // 2) // (factor * factor)).astype(np.uint8)
    u0 = np.floor(u)
    fu = (u - u0)[..., None]
    u0 = u0.astype(np.int64) % width
    u1 = (u0 + 1) % width
    top = flat[row0 + u0] * (1 - fu) + flat[row0 + u1] * fu
    bottom = flat[row1 + u0] * (1 - fu) + flat[row1 + u1] * fu
    return (top * (1 - fv) + bottom * fv + 0.5).astype(np.uint8)


# ------------------------------------------------------------------------------------------ the folder


class RouteFolder:
    """One route folder, parsed once; the mapping and panoramas load lazily (text modality needs neither)."""

    PANO_CACHE = 48  # decoded panoramas kept per folder (~1.5 MB each at 1024x512), shared by all its envs

    def __init__(self, path: Path, max_milestones: int = MAX_MILESTONES, max_image_pixels: int = MAX_IMAGE_PIXELS):
        if not (path / ROUTES_FILE).is_file():
            raise FileNotFoundError(
                f"V-IRL route folder {str(path)!r} has no {ROUTES_FILE} (expected {ROUTES_FILE}, {MAPPING_FILE} and "
                f"{VIEWS_DIR}/ inside; lit_sftrl.envs.city.make_city writes one)"
            )
        self.path, self.max_image_pixels = path, max_image_pixels
        self.routes = read_routes(path / ROUTES_FILE, max_milestones)
        self._lock = threading.Lock()
        self._ids: list[str] | None = None
        self._coords: np.ndarray | None = None
        self._panos: OrderedDict[str, tuple[np.ndarray, float]] = OrderedDict()
        self._near: dict[Geocode, bool] = {}  # has_panorama's answers

    def _load_mapping(self) -> tuple[list[str], np.ndarray]:
        with self._lock:
            if self._ids is None:
                mapping = load_pano_mapping(self.path / MAPPING_FILE)
                if not mapping:
                    raise RouteDataError(f"{self.path / MAPPING_FILE} is empty")
                self._ids = list(mapping.values())
                self._coords = np.array(list(mapping.keys()), dtype=np.float64)
        return self._ids, self._coords

    @property
    def has_mapping(self) -> bool:
        """Whether the folder has a panorama mapping (text-only route folders need none)."""
        return self._ids is not None or (self.path / MAPPING_FILE).is_file()

    def nearest(self, geocode: Geocode) -> tuple[str, float]:
        """The nearest panorama's id and its distance in metres."""
        ids, coords = self._load_mapping()
        distances = haversine_m(geocode[0], geocode[1], coords[:, 0], coords[:, 1])
        best = int(np.argmin(distances))
        return ids[best], float(distances[best])

    def has_panorama(self, geocode: Geocode) -> bool:
        """Whether a panorama lies within 20 m of ``geocode`` (the original's relocation radius); memoised, as
        rails ask about the same interpolated points reset after reset."""
        known = self._near.get(geocode)
        if known is None:
            known = self._near[geocode] = self.nearest(geocode)[1] <= SNAP_RADIUS_M
        return known

    def snap(self, geocode: Geocode, where: str) -> str:
        """The id of the nearest panorama within 20 m of ``geocode``; ``where`` names the route and point."""
        pano_id, distance = self.nearest(geocode)
        if distance > SNAP_RADIUS_M:
            raise LookupError(
                f"{where}: no panorama within {SNAP_RADIUS_M:.0f} m of {geocode} in {self.path / MAPPING_FILE} "
                f"(nearest is {distance:.1f} m away)"
            )
        return pano_id

    def panorama(self, pano_id: str, where: str) -> tuple[np.ndarray, float]:
        """The decoded panorama and its north rotation (LRU-cached)."""
        with self._lock:
            if pano_id in self._panos:
                self._panos.move_to_end(pano_id)
                return self._panos[pano_id]
        # Panorama ids come from the (downloaded) mapping: the files must stay inside street_views/, be regular
        # files (a FIFO would block forever) and declare a sane size before anything is decoded.
        folder = self.path / VIEWS_DIR
        for name in (f"{pano_id}.jpg", f"{pano_id}.metadata.json"):
            if not (folder / name).exists() and not (folder / name).is_symlink():
                raise FileNotFoundError(f"{where}: panorama {pano_id!r} file {folder / name} is missing")
        try:
            image_path = confined_file(folder, f"{pano_id}.jpg", f"{where}: panorama {pano_id!r}")
            meta_path = confined_file(folder, f"{pano_id}.metadata.json", f"{where}: panorama {pano_id!r}")
            check_image_header(image_path, f"{where}: panorama {pano_id!r}", self.max_image_pixels)
        except ValueError as error:
            raise RouteDataError(str(error)) from None
        try:
            rotation = _finite(float(json.loads(meta_path.read_text())["rotation"]), f"{where}: {meta_path} rotation")
        except (KeyError, TypeError, ValueError) as error:
            raise RouteDataError(f"{where}: {meta_path} has no finite numeric 'rotation' ({error})") from None
        with Image.open(image_path) as handle:
            pano = np.asarray(handle.convert("RGB"))
        with self._lock:
            self._panos[pano_id] = (pano, rotation)
            while len(self._panos) > self.PANO_CACHE:
                self._panos.popitem(last=False)
        return pano, rotation

    def views(
        self, geocode: Geocode, headings: list[float], size: int, where: str, fov: float = 90.0
    ) -> list[np.ndarray]:
        """Perspective street views at ``geocode``, one facing each compass heading in ``headings``."""
        pano, rotation = self.panorama(self.snap(geocode, where), where)
        return [perspective_view(pano, rotation, heading, size, fov) for heading in headings]


_FOLDERS: dict[tuple[str, int, int], tuple[tuple[int, int], RouteFolder]] = {}
_FOLDERS_LOCK = threading.Lock()


def load_route_folder(path: str | Path, max_milestones: int = MAX_MILESTONES,
                      max_image_pixels: int = MAX_IMAGE_PIXELS) -> RouteFolder:
    """Parse a route folder once per process and limits: environments on it share one :class:`RouteFolder`.
    The cache is keyed by the resolved path (and limits) and checked against route_infos.json's size and
    modification time, so a folder regenerated in place is read afresh."""
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_dir():
        raise FileNotFoundError(f"V-IRL route folder {str(path)!r} does not exist")
    try:
        stat = (resolved / ROUTES_FILE).stat()
        version = (stat.st_size, stat.st_mtime_ns)
    except FileNotFoundError:
        version = (-1, -1)  # RouteFolder raises the explanatory error
    with _FOLDERS_LOCK:
        cached = _FOLDERS.get(key := (str(resolved), max_milestones, max_image_pixels))
        if cached is None or cached[0] != version:
            cached = _FOLDERS[key] = (version, RouteFolder(resolved, max_milestones, max_image_pixels))
    return cached[1]
