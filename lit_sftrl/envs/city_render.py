"""What a synthetic city looks like: its styles, and the ray-cast equirectangular panoramas of its streets.

A district is an infinite square street grid in local metres (``+y`` = compass ``angle``, ``+x`` = 90 degrees
clockwise of it): streets on multiples of ``block_m``, each ``2 * road_half_m`` of road plus sidewalks; the
rest is buildings, one wall per lot with a hashed height, colour and window grid. Each landmark is a sign on
the sidewalk carrying its name, drawn at its true bearing and hidden when a wall stands in front of it.
Numpy does the per-pixel work, so a 1024x512 panorama takes tens of milliseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

RGB = tuple[int, int, int]
CAMERA_M = 2.5  # camera height above the road
SIGN_M = 4.5  # sign centre height
MAX_RANGE_M = 140.0  # rays stop here (open horizon beyond)
SIGN_RANGE_M = 80.0
MARCH_STEP_M = 0.5
FONT_SCALE = 620.0  # font px = FONT_SCALE / distance, clipped: ~20 px at a corner seen from its intersection
FONT_PX = (11, 24)  # for a 1024-pixel-wide panorama; scaled with the width


@dataclass(frozen=True)
class CityStyle:
    name: str
    origin: tuple[float, float]  # geocode of the first district's first intersection
    grid_angle: float  # compass heading of the streets; keep within ~6 degrees of a multiple of 45
    block_m: float  # intersection spacing; <= 108 so every street point is within 20 m of a panorama
    road_half_m: float
    sidewalk_m: float
    lot_m: float  # facade width of one building
    height_m: tuple[float, float]
    roof_peak_m: float  # 0 = flat roofs
    floor_m: float
    window: tuple[float, float, float, float]  # spacing, width, sill height, window height (metres)
    sky: tuple[RGB, RGB]  # zenith, horizon
    fog: RGB
    asphalt: RGB
    pavement: RGB
    marking: RGB
    window_rgb: RGB
    facades: tuple[RGB, ...]
    sign_colors: tuple[RGB, ...]  # saturated, far from every facade colour
    landmark_names: tuple[str, ...]  # at most two words of <= 10 characters, so signs stay narrow


@dataclass(frozen=True)
class Landmark:
    name: str
    x: float  # local metres
    y: float
    color: int  # index into the style's sign colours


def _offset(c: np.ndarray, spacing: float) -> np.ndarray:
    """Distance from the nearest street centre line along one axis."""
    return np.abs(c - spacing * np.round(c / spacing))


def _hash(*keys: np.ndarray) -> np.ndarray:
    """A deterministic integer hash per element (wrapping uint64 arithmetic)."""
    h = np.full(np.broadcast(*keys).shape, 0x9E3779B97F4A7C15, dtype=np.uint64)
    for key in keys:
        h = (h ^ (np.asarray(key, dtype=np.int64) + 4096).astype(np.uint64)) * np.uint64(0x100000001B3)
        h ^= h >> np.uint64(29)
    return h


def _cast(style: CityStyle, cam: tuple[float, float], dx: np.ndarray, dy: np.ndarray):
    """March one ray per column; return wall distance, along-wall coordinate, face axis and lot hash key."""
    t = np.arange(MARCH_STEP_M / 2, MAX_RANGE_M, MARCH_STEP_M)[:, None]
    px, py = cam[0] + t * dx, cam[1] + t * dy
    edge = style.road_half_m + style.sidewalk_m
    inside = (_offset(px, style.block_m) >= edge) & (_offset(py, style.block_m) >= edge)
    hit = inside.any(axis=0)
    dist = t[inside.argmax(axis=0), 0]
    hx, hy = cam[0] + dist * dx, cam[1] + dist * dy
    depth_x, depth_y = _offset(hx, style.block_m) - edge, _offset(hy, style.block_m) - edge
    x_face = depth_x < depth_y  # the wall crossed is a plane x = const, running along y
    # step back to the wall itself so edges do not staircase
    dist = dist - np.where(x_face, depth_x / np.maximum(np.abs(dx), 1e-3), depth_y / np.maximum(np.abs(dy), 1e-3))
    along = np.where(x_face, hy, hx)
    across = np.where(x_face, hx, hy)
    key = _hash(np.floor(hx / style.block_m), np.floor(hy / style.block_m), x_face,
                np.round(across), np.floor(along / style.lot_m))
    return np.where(hit, dist, np.inf), along, x_face, key


def _palette(colors: tuple[RGB, ...]) -> np.ndarray:
    return np.asarray(colors, dtype=np.float32)


def render_panorama(
    style: CityStyle,
    angle: float,
    cam: tuple[float, float],
    rotation: float,
    landmarks: list[Landmark],
    width: int,
    salt: int,
) -> Image.Image:
    """The equirectangular view from local point ``cam``: compass heading h at column ((h + rotation) mod 360) / 360
    x ``width``, the original reader's convention (see ``lit_sftrl.envs.routes``), so the centre column faces
    180 - rotation."""
    height = width // 2
    compass = (np.arange(width) + 0.5) / width * 360.0 - rotation
    phi = np.radians(compass - angle)
    dx, dy = np.sin(phi), np.cos(phi)
    dist, along, x_face, key = _cast(style, cam, dx, dy)
    key = key ^ np.uint64(salt & 0xFFFFFFFF)
    elevation = (0.5 - (np.arange(height) + 0.5) / height) * np.pi
    tan_e = np.tan(elevation)[:, None].astype(np.float32)

    image = _sky(style, elevation, width)
    ground = np.broadcast_to(tan_e < 0, image.shape[:2])
    image = np.where(ground[..., None], _ground(style, cam, dx, dy, tan_e), image)
    image = _draw_walls(style, image, tan_e, dist, along, x_face, key)
    panorama = np.clip(image + 0.5, 0, 255).astype(np.uint8)
    for mark in sorted(landmarks, key=lambda m: -math.hypot(m.x - cam[0], m.y - cam[1])):
        _draw_sign(panorama, style, mark, cam, angle, rotation, dist)
    return Image.fromarray(panorama)


def _sky(style: CityStyle, elevation: np.ndarray, width: int) -> np.ndarray:
    zenith, horizon = _palette(style.sky)
    mix = np.clip(elevation / (np.pi / 2), 0, 1)[:, None, None] ** 0.6
    column = horizon * (1 - mix) + zenith * mix
    return np.broadcast_to(column, (len(elevation), width, 3)).astype(np.float32)


def _ground(style: CityStyle, cam, dx, dy, tan_e: np.ndarray) -> np.ndarray:
    """Road, sidewalk and dashed centre lines where each downward ray meets the ground."""
    reach = CAMERA_M / np.maximum(-tan_e, 1e-4)
    gx, gy = cam[0] + reach * dx, cam[1] + reach * dy
    ox, oy = _offset(gx, style.block_m), _offset(gy, style.block_m)
    road = (ox < style.road_half_m) | (oy < style.road_half_m)
    dash_x = (ox < 0.15) & (oy >= style.road_half_m) & (np.mod(gy, 6.0) < 3.0)
    dash_y = (oy < 0.15) & (ox >= style.road_half_m) & (np.mod(gx, 6.0) < 3.0)
    colour = np.where(road[..., None], _palette((style.asphalt,)), _palette((style.pavement,)))
    colour = np.where((dash_x | dash_y)[..., None], _palette((style.marking,)), colour)
    haze = np.clip(reach / MAX_RANGE_M, 0, 1)[..., None] * 0.7
    return colour * (1 - haze) + _palette((style.fog,)) * haze


def _draw_walls(style: CityStyle, image, tan_e, dist, along, x_face, key) -> np.ndarray:
    """Facades: per-lot height, colour and roof, a window grid, a darker shop floor, distance haze."""
    lo, hi = style.height_m
    hit = np.isfinite(dist)
    safe = np.where(hit, dist, 1e6).astype(np.float32)
    tall = lo + (key % np.uint64(997)).astype(np.float32) / 997.0 * (hi - lo)
    lot_pos = np.mod(along, style.lot_m) / style.lot_m
    top = tall + style.roof_peak_m * (1 - np.abs(2 * lot_pos - 1))
    z = CAMERA_M + safe[None, :] * tan_e
    wall = hit[None, :] & (z >= 0) & (z <= top[None, :])
    facade = _palette(style.facades)[(key // np.uint64(997) % np.uint64(len(style.facades))).astype(np.int64)]
    facade = facade * np.where(x_face, 0.82, 1.0)[:, None]  # two wall orientations, two shades
    spacing, win_w, sill, win_h = style.window
    level = np.mod(z, style.floor_m)
    windows = (np.mod(along, spacing) < win_w)[None, :] & (level >= sill) & (level < sill + win_h)
    windows &= (z > style.floor_m) & (z < top[None, :] - 0.6)
    colour = np.where(windows[..., None], _palette((style.window_rgb,)), facade[None, :, :])
    colour = np.where((z < style.floor_m)[..., None], colour * 0.62, colour)
    haze = (np.clip(safe / MAX_RANGE_M, 0, 1) * 0.6)[None, :, None]
    colour = colour * (1 - haze) + _palette((style.fog,)) * haze
    return np.where(wall[..., None], colour, image)


@lru_cache(maxsize=1024)
def _sign_image(name: str, color: RGB, font_px: int) -> np.ndarray:
    """A board in the landmark's colour with its name in one or two lines."""
    words = name.split()
    split = min(range(1, len(words) + 1), key=lambda k: max(len(" ".join(words[:k])), len(" ".join(words[k:]))))
    lines = [line for line in (" ".join(words[:split]), " ".join(words[split:])) if line]
    font = ImageFont.load_default(size=font_px)
    boxes = [font.getbbox(line) for line in lines]
    pad, gap = max(2, font_px // 4), max(1, font_px // 6)
    line_h = max(b[3] for b in boxes)
    w = max(b[2] for b in boxes) + 2 * pad
    h = len(lines) * line_h + (len(lines) - 1) * gap + 2 * pad
    board = Image.new("RGB", (w, h), color)
    draw = ImageDraw.Draw(board)
    ink = (20, 20, 20) if sum(c * k for c, k in zip(color, (0.3, 0.59, 0.11))) > 150 else (255, 255, 255)
    for i, (line, box) in enumerate(zip(lines, boxes)):
        draw.text(((w - box[2]) / 2, pad + i * (line_h + gap)), line, font=font, fill=ink)
    draw.rectangle((0, 0, w - 1, h - 1), outline=tuple(int(c * 0.55) for c in color))
    return np.asarray(board)


def _draw_sign(panorama, style: CityStyle, mark: Landmark, cam, angle: float, rotation: float, dist) -> None:
    """Paste ``mark``'s sign at its bearing from ``cam`` unless a wall is nearer along that bearing."""
    height, width = panorama.shape[:2]
    vx, vy = mark.x - cam[0], mark.y - cam[1]
    distance = math.hypot(vx, vy)
    if not 1.0 < distance <= SIGN_RANGE_M:
        return
    compass = angle + math.degrees(math.atan2(vx, vy))
    column = ((compass + rotation) / 360.0 % 1.0) * width
    if dist[int(column) % width] < distance - 1.0:
        return
    font_px = max(6, int(np.clip(FONT_SCALE / distance, *FONT_PX) * width / 1024 + 0.5))
    sign = _sign_image(mark.name, style.sign_colors[mark.color % len(style.sign_colors)], font_px)
    elevation = math.atan2(SIGN_M - CAMERA_M, distance)
    row = int(round((0.5 - elevation / math.pi) * height - sign.shape[0] / 2))
    cols = (int(round(column - sign.shape[1] / 2)) + np.arange(sign.shape[1])) % width
    panorama[row : row + sign.shape[0], cols] = sign


# ------------------------------------------------------------------------------------------------ styles

STYLES: dict[str, CityStyle] = {
    # Training city (id and rule_ood), NYC-like: tall brick and stone blocks, wide avenues, chain-store signs.
    "metro": CityStyle(
        name="metro", origin=(40.7484, -73.9857), grid_angle=3.0, block_m=80.0, road_half_m=7.0,
        sidewalk_m=4.0, lot_m=80.0 / 3, height_m=(18.0, 70.0), roof_peak_m=0.0, floor_m=3.5,
        window=(2.5, 1.4, 1.0, 1.7), sky=((80, 130, 195), (190, 208, 228)), fog=(185, 195, 205),
        asphalt=(62, 62, 68), pavement=(158, 156, 150), marking=(235, 200, 60), window_rgb=(45, 60, 80),
        facades=((150, 78, 62), (122, 92, 72), (150, 150, 148), (200, 186, 160), (92, 92, 98), (222, 212, 192)),
        sign_colors=((0, 120, 60), (205, 15, 45), (0, 70, 180), (245, 115, 0), (120, 40, 150), (250, 205, 0)),
        landmark_names=(
            "Starbucks", "Chase Bank", "Duane Reade", "Joe's Pizza", "Apple Store", "Shake Shack", "CVS Pharmacy",
            "Citibank", "Bagel Deli", "Gray's Papaya", "Pret Cafe", "Taco Bell", "Subway", "Key Food",
            "Whole Foods", "Best Buy", "Foot Locker", "Sephora", "Uniqlo", "Gap Store", "TD Bank", "Wells Fargo",
            "Halal Cart", "Book Shop", "Ace Hotel", "Hilton Hotel", "Post Office", "City Bakery", "Corner Deli",
            "Nail Salon", "Barber Shop", "Dunkin", "McDonald's", "Chipotle", "Panera Bread", "Sweetgreen",
            "Blue Bottle", "Katz's Deli", "Macy's", "Zara", "Target", "Trader Joe's", "Petco", "Staples",
            "Verizon", "Bank of America", "Gristedes", "Fairway", "Food Hall", "Pizza Hut",
        ),
    ),
    # Visual-ood city: low pastel houses with pitched roofs, narrow cobbled lanes, dark painted signs.
    "harbor": CityStyle(
        name="harbor", origin=(43.2965, 5.3698), grid_angle=-4.0, block_m=96.0, road_half_m=4.5,
        sidewalk_m=2.5, lot_m=96.0 / 6, height_m=(7.0, 13.0), roof_peak_m=3.5, floor_m=3.0,
        window=(3.5, 1.2, 0.9, 1.4), sky=((110, 165, 215), (236, 226, 208)), fog=(226, 218, 204),
        asphalt=(138, 118, 98), pavement=(192, 176, 150), marking=(245, 245, 240), window_rgb=(70, 90, 110),
        facades=((236, 200, 190), (190, 215, 232), (240, 226, 160), (246, 246, 240), (200, 226, 200),
                 (222, 192, 226)),
        sign_colors=((20, 40, 95), (125, 20, 32), (20, 92, 52), (0, 118, 130), (200, 140, 0), (92, 30, 84)),
        landmark_names=(
            "Fish Market", "Anchor Inn", "Harbor Cafe", "Sailor's Pub", "Lighthouse", "Boat Rental",
            "Oyster Bar", "Ferry Dock", "Sea Museum", "Net Loft", "Crab Shack", "Dock Bakery", "Tide Hotel",
            "Gull Books", "Rope Store", "Salt House", "Pier Tavern", "Shell Gifts", "Wave Surf", "Kelp Deli",
            "Marina Bank", "Coast Post", "Dune Bar", "Pearl Diner", "Chandlery", "Bait Shop", "Sea Pharmacy",
            "Yacht Club", "Mussel Pot", "Buoy Bistro", "Sardine Can", "Compass Inn", "Port Office",
            "Seaside Spa", "Gelato Bar", "Tackle Shop",
        ),
    ),
}
