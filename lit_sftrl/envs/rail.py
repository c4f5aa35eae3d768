"""A V-IRL route's instructions and *rail*, the expert trajectory the agent walks on (docs/spec.md §2).

The rail is the original code's, with relocation on (as its configs ran it): the start (turn to the first
heading), then along each segment between milestones the candidates at fractions i/n, i = 1..n
(n = ``straight_line_length``), each first dropped with probability ``drop_rate`` (drawn from the env's seeded
generator, one draw per candidate, so a route and a seed give one rail), then kept only if it lies more than
8 m from both ends of the segment (a segment of 5 m or less gets no candidates; i = n is the end itself and
never survives), then only if a panorama lies within 20 m (when the route folder has a panorama mapping);
then the intersection (turn) or the destination (``stop()``).

Deliberate differences from the original: the 8 m test is measured on the interpolated point, not on the
panorama it snaps to (text tasks need no panoramas, and text and image tasks should walk one rail), and the
drops come from the env's seeded generator instead of Python's global ``random``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from lit_sftrl.envs.routes import NO_LANDMARK, Geocode, Route, haversine_m, interpolate, wrap_degrees

FORWARD, STOP = "forward()", "stop()"
INTERSECTION_TEXT = "You observe an intersection"
MIN_SEGMENT_M = 5.0  # segments this short get no forward points
END_CLEARANCE_M = 8.0  # a forward point must be farther than this from both ends of its segment


def turn_sentence(first: bool, relative: str, compass: str) -> str:
    return f"{'First, turn' if first else 'Turn'} {relative} to face {compass}."


def move_sentence(landmarks: str, last: bool) -> str:
    if last:
        return f"Move forward until you reach destination where {landmarks}."
    if landmarks == NO_LANDMARK:
        return "Move forward until you reach next intersection."
    return f"Move forward until you reach next intersection where {landmarks}."


def relative_word(delta: float) -> str:
    """Relative turn for a heading change: beyond 45 degrees a full turn, else a slight one (0 -> slightly left)."""
    delta = wrap_degrees(delta)
    if delta < -45:
        return "left"
    if delta > 45:
        return "right"
    return "slightly left" if delta <= 0 else "slightly right"


@dataclass(frozen=True)
class RailPoint:
    geocode: tuple[float, float]
    heading: float  # the way the agent faces here (views are cut facing it)
    absolute_action: str
    relative_action: str
    landmark: str  # the landmark text observed here
    at_intersection: bool
    instruction: int  # index of the sentence to execute here

    def observation(self) -> str:
        return f"{self.landmark}; {INTERSECTION_TEXT}" if self.at_intersection else self.landmark


def route_sentences(route: Route, init_heading: float) -> tuple[list[str], list[str]]:
    """Instruction sentences (turn, move per milestone) and the relative word of each milestone's turn."""
    sentences, relatives, previous = [], [], init_heading
    last = len(route.milestones) - 1
    for index, milestone in enumerate(route.milestones):
        relatives.append(relative_word(milestone.heading - previous))
        sentences.append(turn_sentence(index == 0, relatives[-1], milestone.compass))
        sentences.append(move_sentence(milestone.landmarks, index == last))
        previous = milestone.heading
    return sentences, relatives


@lru_cache(maxsize=1 << 16)
def _segment_candidates(start: Geocode, end: Geocode, points: int) -> tuple[Geocode | None, ...] | None:
    """Candidates i/n, i = 1..n, of one segment, None where one is within 8 m of an end; None for a segment too
    short to get any. Pure geometry, so cached: a reset then only draws the drops."""
    length = float(haversine_m(*start, *end))
    if length <= MIN_SEGMENT_M:
        return None
    # Distances along the segment are i/n and 1 - i/n of its length (the points are interpolated linearly).
    return tuple(interpolate(start, end, i / points) if min(i / points, 1 - i / points) * length > END_CLEARANCE_M
                 else None for i in range(1, points + 1))


def forward_candidates(start: Geocode, end: Geocode, points: int, drop_rate: float,
                       rng: np.random.Generator) -> list[Geocode]:
    """The forward() points the original keeps on one segment, before the panorama check (module docstring)."""
    candidates = _segment_candidates(start, end, points) if points else None
    if candidates is None:
        return []
    draws = rng.random(points)  # one draw per candidate, as the original, so one seed gives one rail
    return [point for point, draw in zip(candidates, draws) if point is not None and draw >= drop_rate]


def build_rail(
    route: Route, init_heading: float, relatives: list[str], points: int, drop_rate: float, rng: np.random.Generator,
    has_panorama: Callable[[Geocode], bool] | None = None,
) -> tuple[list[RailPoint], int]:
    """The expert trajectory (start turn, forward points, turns at intersections, stop at the end), and how many
    forward points were skipped because ``has_panorama`` said no panorama lies within 20 m of them."""
    milestones = route.milestones
    rail = [
        RailPoint(route.start, init_heading, f"turn_direction({milestones[0].compass})",
                  f"turn_direction({relatives[0]})", NO_LANDMARK, False, 0)
    ]
    previous, skipped = route.start, 0
    for index, target in enumerate(route.geocodes):
        heading = milestones[index].heading
        for geocode in forward_candidates(previous, target, points, drop_rate, rng):
            if has_panorama is not None and not has_panorama(geocode):
                skipped += 1
                continue
            rail.append(RailPoint(geocode, heading, FORWARD, FORWARD, NO_LANDMARK, False, 2 * index + 1))
        arrived = milestones[index].landmarks
        if index + 1 < len(milestones):
            turn = milestones[index + 1]
            rail.append(RailPoint(target, heading, f"turn_direction({turn.compass})",
                                  f"turn_direction({relatives[index + 1]})", arrived, True, 2 * index + 2))
        else:  # the destination shares the last move sentence
            rail.append(RailPoint(target, heading, STOP, STOP, arrived, False, 2 * index + 1))
        previous = target
    return rail, skipped
