"""The image skills of the pretraining corpus (:mod:`lit_sftrl.pretraining.skills`): rendered card tables
of every suit and colour, and street-view panels of every city style around one landmark sign, each described
in text."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from lit_sftrl.core.seeding import pick
from lit_sftrl.envs.cards import RANKS, RED_SUITS, SUITS, Card, render_table
from lit_sftrl.envs.city_render import STYLES, Landmark, render_panorama
from lit_sftrl.envs.routes import perspective_view

STYLE_WORDS = {  # what a caption says about each city style (styles without an entry get their name only)
    "metro": "a big-city avenue with tall brick and stone blocks",
    "harbor": "a harbour-town lane with low pastel houses and pitched roofs",
}
PANELS = ("upper left", "upper right", "lower left", "lower right")  # the 2x2 panel order: ahead, right, back, left
SIDES = ("ahead of you", "to your right", "behind you", "to your left")


def card_image(rng: np.random.Generator, size: int) -> tuple[str, str, np.ndarray]:
    cards = [Card(pick(rng, RANKS), pick(rng, SUITS)) for _ in range(int(rng.integers(1, 6)))]
    names = [f"{card.rank} of {card.suit}" for card in cards]
    colours = ["red" if card.suit in RED_SUITS else "black" for card in cards]
    kind = int(rng.integers(3))
    if kind == 0:
        question, answer = "Which cards lie on the table, from left to right?", ", ".join(names)
    elif kind == 1:
        question, answer = "List the ranks you see, left to right.", ", ".join(card.rank for card in cards)
    else:
        question = "Name each card and its colour."
        answer = "; ".join(f"{name} ({colour})" for name, colour in zip(names, colours))
    return question, answer, render_table(cards, size)


def street_image(rng: np.random.Generator, scenes: int, size: int, seed: int) -> tuple[str, str, np.ndarray, dict]:
    style = pick(rng, sorted(STYLES))
    image, name, panel = _street_scene(style, int(rng.integers(scenes)), size, seed)
    where = f"{SIDES[panel]}, in the {PANELS[panel]} panel"
    described = STYLE_WORDS.get(style, f"a street in the {style} style")
    kind, meta = int(rng.integers(3)), {"style": described}
    if kind == 0:
        return "Describe this street.", f"This is {described}. A {name} sign stands {where}.", image, meta
    if kind == 1:
        return "What sign can you read, and where is it?", f"{name}, {where}.", image, {}
    return "What kind of place is shown?", f"{described[0].upper()}{described[1:]}.", image, meta


@lru_cache(maxsize=256)
def _street_scene(style_name: str, scene: int, size: int, seed: int) -> tuple[np.ndarray, str, int]:
    """Four views (ahead, right, back, left) around a street corner with one landmark sign, as a 2x2 grid."""
    rng = np.random.default_rng([seed, scene, len(style_name)])
    style = STYLES[style_name]
    name = pick(rng, style.landmark_names)
    edge, along = style.road_half_m + style.sidewalk_m - 1.0, style.block_m * 0.34  # as the city generator does
    sx, sy = pick(rng, (-1, 1)), pick(rng, (-1, 1))
    x, y = (sx * along, sy * edge) if rng.random() < 0.5 else (sx * edge, sy * along)
    heading = style.grid_angle + 90.0 * int(rng.integers(4))
    rotation = float(rng.uniform(0, 360))
    width = max(256, 2 * size)
    pano = np.asarray(render_panorama(style, style.grid_angle, (0.0, 0.0), rotation,
                                      [Landmark(name, x, y, int(rng.integers(len(style.sign_colors))))], width, scene))
    bearing = style.grid_angle + float(np.degrees(np.arctan2(x, y)))
    panel = int(((bearing - heading + 45.0) % 360.0) // 90.0)
    tile = size // 2
    grid = np.zeros((size, size, 3), np.uint8)
    for k in range(4):
        row, col = divmod(k, 2)
        view = perspective_view(pano, rotation, heading + 90 * k, tile)
        grid[row * tile:(row + 1) * tile, col * tile:(col + 1) * tile] = view
    return grid, name, panel
