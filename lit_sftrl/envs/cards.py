"""Playing cards and the GeneralPoints table image: white cards laid left to right on green felt.

Each card shows its rank large in the upper half and its suit as a large pip in the lower half, red for
hearts and diamonds, black for spades and clubs, so both stay legible at 224 px with four cards. Suits are
drawn as shapes: Pillow's built-in font has no suit glyphs, and no font is downloaded.

Rendering is deterministic and cheap: every card is drawn once per (card, pixel size) at 4x and downsampled
(anti-aliasing), already blended onto the table colour, and cached; a table image is then a background
fill plus one array copy per card.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

RANKS = ("A", "2", "3", "4", "5", "6", "7", "8", "9", "10", "J", "Q", "K")
SUITS = ("spades", "clubs", "hearts", "diamonds")
RED_SUITS = frozenset({"hearts", "diamonds"})
SUIT_GROUPS = {"black": ("spades", "clubs"), "red": ("hearts", "diamonds"), "all": SUITS}

TABLE_GREEN = (24, 110, 58)
CARD_WHITE = (250, 250, 246)
CARD_EDGE = (120, 120, 120)
INK_RED = (205, 18, 32)
INK_BLACK = (12, 12, 12)

_SUPERSAMPLE = 4
_MARGIN, _GAP = 0.04, 0.03  # fractions of the image width
_ASPECT = 1.45  # card height / width, capped so tall cards still fit the table


class Card(NamedTuple):
    rank: str  # one of RANKS: the label a model must read
    suit: str  # one of SUITS


def deck(suits: str) -> tuple[Card, ...]:
    """The cards a hand is drawn from: all ranks of the suits in ``SUIT_GROUPS[suits]``."""
    return tuple(Card(rank, suit) for suit in SUIT_GROUPS[suits] for rank in RANKS)


def draw_hand(cards: Sequence[Card], count: int, rng: np.random.Generator) -> tuple[Card, ...]:
    """``count`` distinct cards in random order, every ordered hand equally likely.

    One raw 64-bit draw, read as a mixed-radix number (card i picked among the len(cards) - i left): several
    times cheaper than ``rng.permutation``, which matters because a reset may deal a few times.
    """
    code, pool = _uniform_below(math.perm(len(cards), count), rng), list(cards)
    hand = []
    for left in range(len(pool), len(pool) - count, -1):
        code, position = divmod(code, left)
        hand.append(pool.pop(position))
    return tuple(hand)


def draw_iid_hand(
    suits: Sequence[str], count: int, rng: np.random.Generator, forced_ranks: Sequence[str] = ()
) -> tuple[Card, ...]:
    """The original code's deal: ranks i.i.d. uniform over A..K *with replacement*, each suit drawn at random
    from ``suits``. With ``forced_ranks`` (the 11-13 rule: J, Q, K), ``count - 1`` such ranks plus one drawn
    from ``forced_ranks``, shuffled, so the forced card can sit anywhere. The same card may occur twice.

    One raw draw read as mixed-radix digits, as :func:`draw_hand`. The shuffle is the forced card put at a
    uniform position: the free ranks are i.i.d., so that is the same distribution as shuffling them all.
    """
    free = count - 1 if forced_ranks else count
    radices = [len(RANKS)] * free + ([len(forced_ranks), count] if forced_ranks else []) + [len(suits)] * count
    code, digits = _uniform_below(math.prod(radices), rng), []
    for radix in radices:
        code, digit = divmod(code, radix)
        digits.append(digit)
    ranks = [RANKS[digit] for digit in digits[:free]]
    if forced_ranks:
        ranks.insert(digits[free + 1], forced_ranks[digits[free]])
    return tuple(Card(rank, suits[digit]) for rank, digit in zip(ranks, digits[-count:]))


def _uniform_below(bound: int, rng: np.random.Generator) -> int:
    """An exactly uniform integer in ``[0, bound)``, bound < 2**64: raw draws, rejecting the biased top."""
    limit = (1 << 64) - (1 << 64) % bound
    while (raw := int(rng.bit_generator.random_raw())) >= limit:
        pass
    return raw % bound


def render_table(cards: Sequence[Card], size: int) -> np.ndarray:
    """A ``size`` x ``size`` RGB uint8 image of ``cards`` laid out left to right on the table."""
    width, height, xs, y = _layout(size, len(cards))
    image = _table(size).copy()
    for card, x in zip(cards, xs):
        image[y : y + height, x : x + width] = _card_pixels(card, width, height)
    return image


def _layout(size: int, count: int) -> tuple[int, int, list[int], int]:
    """Card width and height, left edges and top edge: equal cards, centred as a row."""
    margin, gap = round(size * _MARGIN), round(size * _GAP)
    width = (size - 2 * margin - (count - 1) * gap) // count
    height = min(round(width * _ASPECT), size - 2 * margin)
    left = (size - count * width - (count - 1) * gap) // 2
    return width, height, [left + i * (width + gap) for i in range(count)], (size - height) // 2


@lru_cache(maxsize=16)
def _table(size: int) -> np.ndarray:
    table = np.empty((size, size, 3), np.uint8)
    table[:] = TABLE_GREEN
    table.flags.writeable = False  # shared by every render: copied, never drawn on
    return table


@lru_cache(maxsize=4096)
def _card_pixels(card: Card, width: int, height: int) -> np.ndarray:
    """One card, drawn big and downsampled, blended onto the table so it can be copied in as a block."""
    sprite = _draw_card(card, width * _SUPERSAMPLE, height * _SUPERSAMPLE)
    sprite = sprite.resize((width, height), Image.Resampling.LANCZOS)
    table = Image.new("RGBA", (width, height), TABLE_GREEN + (255,))
    pixels = np.array(Image.alpha_composite(table, sprite).convert("RGB"))
    pixels.flags.writeable = False
    return pixels


def _draw_card(card: Card, width: int, height: int) -> Image.Image:
    """A white rounded card on a transparent ground: rank in the upper half, suit pip in the lower half."""
    sprite = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(sprite)
    box = (0, 0, width - 1, height - 1)
    draw.rounded_rectangle(box, radius=width // 8, fill=CARD_WHITE, outline=CARD_EDGE, width=max(1, width // 40))
    ink = INK_RED if card.suit in RED_SUITS else INK_BLACK
    # "10" is the widest label; at this size it still fits in about 60% of the card width. A thin stroke makes
    # the default (light) face bold enough to survive the downsampling.
    font = ImageFont.load_default(size=max(8, round(width * 0.5)))
    stroke = max(1, width // 70)
    draw.text((width / 2, height * 0.3), card.rank, ink, font, anchor="mm", stroke_width=stroke, stroke_fill=ink)
    _draw_suit(draw, card.suit, width / 2, height * 0.7, min(width * 0.5, height * 0.34), ink)
    return sprite


def _draw_suit(draw: ImageDraw.ImageDraw, suit: str, cx: float, cy: float, size: float, ink: tuple) -> None:
    """A suit pip of height ``size`` centred on (cx, cy), built from circles and polygons."""
    s = size

    def disc(x: float, y: float, r: float) -> None:
        draw.ellipse((x - r, y - r, x + r, y + r), fill=ink)

    def stem() -> None:
        draw.polygon([(cx, cy), (cx - 0.17 * s, cy + 0.5 * s), (cx + 0.17 * s, cy + 0.5 * s)], fill=ink)

    if suit == "diamonds":
        draw.polygon([(cx, cy - 0.5 * s), (cx + 0.36 * s, cy), (cx, cy + 0.5 * s), (cx - 0.36 * s, cy)], fill=ink)
    elif suit == "hearts":
        disc(cx - 0.22 * s, cy - 0.2 * s, 0.25 * s)
        disc(cx + 0.22 * s, cy - 0.2 * s, 0.25 * s)
        draw.polygon([(cx - 0.46 * s, cy - 0.12 * s), (cx + 0.46 * s, cy - 0.12 * s), (cx, cy + 0.5 * s)], fill=ink)
    elif suit == "spades":
        disc(cx - 0.22 * s, cy + 0.08 * s, 0.24 * s)
        disc(cx + 0.22 * s, cy + 0.08 * s, 0.24 * s)
        draw.polygon([(cx - 0.45 * s, cy + 0.02 * s), (cx + 0.45 * s, cy + 0.02 * s), (cx, cy - 0.5 * s)], fill=ink)
        stem()
    elif suit == "clubs":
        disc(cx, cy - 0.26 * s, 0.21 * s)
        disc(cx - 0.24 * s, cy + 0.06 * s, 0.21 * s)
        disc(cx + 0.24 * s, cy + 0.06 * s, 0.21 * s)
        disc(cx, cy - 0.02 * s, 0.12 * s)
        stem()
    else:
        raise ValueError(f"suit={suit!r} is not valid; allowed values: {', '.join(map(repr, SUITS))}")
