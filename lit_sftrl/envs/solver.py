"""Which multisets of card values can make the target, and how: computed once per process, then looked up.

A hand's solvability depends only on the sorted multiset of its values (4 cards of ranks 1..13 give 1,820
multisets), so a reset asks :func:`is_solvable`, a set lookup, instead of searching. The search itself is a
dynamic programme over sub-multisets: the values reachable from a multiset are the values reachable by
splitting it in two and combining one value of each side with ``+ - * /``; sub-results are memoised and shared
by every multiset that contains them. Arithmetic is exact (``Fraction``).

The language searched is exactly the one arithmetic.py accepts: binary operators and parentheses, no unary
minus. Solutions are rendered with the fewest parentheses that keep the value, e.g. ``8/(3-8/3)``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from fractions import Fraction
from functools import cache

Multiset = tuple[int, ...]  # sorted card values
MAX_CARD_VALUE = 13
# Multisets with more cards are solved on first sight (memoised) rather than tabulated up front: the table
# for 5 cards would take tens of seconds to build, and the paper only plays with 4.
MAX_TABULATED_CARDS = 4

_ATOM, _PRODUCT, _SUM = 3, 2, 1  # precedence of an expression's outermost operator
_PRECEDENCE = {"+": _SUM, "-": _SUM, "*": _PRODUCT, "/": _PRODUCT}


def is_solvable(values: Multiset, target: int) -> bool:
    """Whether the sorted ``values`` can make ``target``; a table lookup for up to 4 cards."""
    if len(values) <= MAX_TABULATED_CARDS:
        return values in _solvable_table(len(values), target)
    return _solvable(values, target)


def solutions(values: Multiset, target: int) -> tuple[str, ...]:
    """Every distinct formula (fewest parentheses, no spaces) that makes ``target`` from the sorted ``values``.

    Sorted, so that drawing one with a seeded RNG is reproducible. Memoised per multiset: the expert
    asks for them on each answer, but each multiset is enumerated once per process.
    """
    return _solutions(tuple(values), target)


def multisets(num_cards: int, max_value: int = MAX_CARD_VALUE) -> Iterator[Multiset]:
    """All sorted multisets of ``num_cards`` values in ``1..max_value``."""
    return itertools.combinations_with_replacement(range(1, max_value + 1), num_cards)


@cache
def _solvable_table(num_cards: int, target: int) -> frozenset[Multiset]:
    """The solvable multisets of ``num_cards`` values in 1..13, built on first use (well under a second)."""
    return frozenset(values for values in multisets(num_cards) if _solvable(values, target))


def _solvable(values: Multiset, target: int) -> bool:
    """Search one multiset: only the last operation has to hit the target, so look its other operand up."""
    goal = Fraction(target)
    if len(values) == 1:
        return values[0] == goal
    for left, right in _splits(values, ordered=False):
        reachable = _reachable(right)
        for x in _reachable(left):
            # x op y == goal or y op x == goal, solved for y
            wanted = [goal - x, x - goal, x + goal]
            if x != 0:  # else x*y, x/y and y/x cannot make a non-zero goal
                wanted += [goal / x, x / goal, x * goal]
            if any(y in reachable for y in wanted):
                return True
    return False


@cache
def _reachable(values: Multiset) -> frozenset[Fraction]:
    """Every value an expression over ``values`` (each used once) can take."""
    if len(values) == 1:
        return frozenset({Fraction(values[0])})
    found: set[Fraction] = set()
    for left, right in _splits(values, ordered=False):
        for x in _reachable(left):
            for y in _reachable(right):
                found.update((x + y, x - y, y - x, x * y))
                if y != 0:
                    found.add(x / y)
                if x != 0:
                    found.add(y / x)
    return frozenset(found)


@cache
def _solutions(values: Multiset, target: int) -> tuple[str, ...]:
    goal = Fraction(target)
    found: set[str] = set()
    for left, right in _splits(values, ordered=True):
        left_map, right_map = _expressions(left), _expressions(right)
        for x, left_texts in left_map.items():
            for symbol in _PRECEDENCE:
                right_texts = right_map.get(_other_operand(symbol, x, goal), ())
                found.update(_combine(symbol, a, b)[0] for a in left_texts for b in right_texts)
    return tuple(sorted(found))


def _other_operand(symbol: str, x: Fraction, goal: Fraction) -> Fraction | None:
    """The ``y`` with ``x <symbol> y == goal``, or None if there is none."""
    if symbol == "+":
        return goal - x
    if symbol == "-":
        return x - goal
    if symbol == "*":
        return goal / x if x != 0 else None
    return x / goal if goal != 0 and x != 0 else None


@cache
def _expressions(values: Multiset) -> dict[Fraction, frozenset[tuple[str, int]]]:
    """Every expression over ``values`` grouped by value, as ``(text, precedence)`` pairs."""
    if len(values) == 1:
        return {Fraction(values[0]): frozenset({(str(values[0]), _ATOM)})}
    grouped: dict[Fraction, set[tuple[str, int]]] = {}
    for left, right in _splits(values, ordered=True):
        for x, left_texts in _expressions(left).items():
            for y, right_texts in _expressions(right).items():
                for symbol, value in _apply_all(x, y):
                    texts = grouped.setdefault(value, set())
                    texts.update(_combine(symbol, a, b) for a in left_texts for b in right_texts)
    return {value: frozenset(texts) for value, texts in grouped.items()}


def _apply_all(x: Fraction, y: Fraction) -> Iterator[tuple[str, Fraction]]:
    yield "+", x + y
    yield "-", x - y
    yield "*", x * y
    if y != 0:
        yield "/", x / y


def _combine(symbol: str, left: tuple[str, int], right: tuple[str, int]) -> tuple[str, int]:
    """Render ``left <symbol> right`` with parentheses only where reading left to right would change it.

    Dropping parentheses around a right operand of ``+`` or ``*`` (``a+(b-c)`` -> ``a+b-c``, ``a*(b/c)`` ->
    ``a*b/c``) changes the tree but not the exact value, so the text still evaluates to the same number.
    """
    precedence = _PRECEDENCE[symbol]
    left_text = f"({left[0]})" if left[1] < precedence else left[0]
    wrap_right = right[1] < precedence or (right[1] == precedence and symbol in "-/")
    right_text = f"({right[0]})" if wrap_right else right[0]
    return f"{left_text}{symbol}{right_text}", precedence


def _splits(values: Multiset, ordered: bool) -> list[tuple[Multiset, Multiset]]:
    """The distinct ways to cut a sorted multiset into two non-empty sorted parts.

    ``ordered=False`` keeps one of (A, B) and (B, A), enough where the caller tries both operand orders.
    """
    found: set[tuple[Multiset, Multiset]] = set()
    indices = range(len(values))
    for size in range(1, len(values)):
        for chosen in itertools.combinations(indices, size):
            left = tuple(values[i] for i in chosen)
            right = tuple(values[i] for i in indices if i not in chosen)
            if ordered or (right, left) not in found:
                found.add((left, right))
    return sorted(found)
