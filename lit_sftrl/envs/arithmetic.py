"""Exact, safe evaluation of a model's arithmetic formula (the GeneralPoints answer).

The formula language is the 24 game's, and it is the same language the solver searches (solver.py), so
"solvable" and "accepted" mean the same thing:

- whole numbers written in decimal digits (no signs, decimal points, exponents or leading zeros);
- the binary operators ``+ - * /`` and parentheses; whitespace anywhere;
- an optional trailing ``= <target>`` (e.g. ``(1 + 2 + 3) * 4 = 24``).

Unary minus (and plus) is rejected on purpose: the game combines card values with binary operations only, a
negative literal is not a card value, and the solver never uses it. Evaluation is exact (``Fraction``), so
``8/(3-8/3)`` is 24. Division by zero makes the formula malformed.

Model text never reaches ``eval``: the characters are checked against a whitelist, the text is capped in
length, then parsed by ``ast.parse`` and walked by a tiny interpreter that accepts only the nodes above.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

MAX_FORMULA_CHARS = 200
_ALLOWED = re.compile(r"[0-9+\-*/()=\s]*")
_WHITESPACE = re.compile(r"\s+")
_INTEGER = re.compile(r"[0-9]+")
_OPERATORS: dict[type, Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}


class FormulaError(ValueError):
    """The formula is missing, unparseable, uses illegal characters or is otherwise malformed."""


@dataclass(frozen=True)
class Evaluation:
    """An accepted formula: its exact value and the numbers it uses, left to right."""

    value: Fraction
    numbers: tuple[int, ...]


def evaluate_formula(text: object, target: int | None = None) -> Evaluation:
    """Evaluate ``text`` exactly; raise :class:`FormulaError` with a human-readable reason if it is malformed.

    A trailing ``= N`` is accepted only when ``N`` equals ``target`` (the model restating the goal); anything
    else after ``=`` is malformed, as is a formula with more than one ``=``.
    """
    if not isinstance(text, str):
        raise FormulaError(f"the formula must be a string, not {type(text).__name__}")
    if len(text) > MAX_FORMULA_CHARS:
        raise FormulaError(f"the formula is longer than {MAX_FORMULA_CHARS} characters")
    if not _ALLOWED.fullmatch(text):
        bad = sorted({char for char in text if not _ALLOWED.fullmatch(char)})
        raise FormulaError(
            f"it contains illegal characters {''.join(bad)!r}; only digits, + - * / ( ) and spaces are allowed"
        )
    expression = _strip_target(_WHITESPACE.sub(" ", text).strip(), target)
    if not expression:
        raise FormulaError("the formula is empty")
    numbers: list[int] = []
    value = _interpret(_parse(expression), numbers)
    return Evaluation(value=value, numbers=tuple(numbers))


def format_number(value: Fraction | int) -> str:
    """``7`` for whole numbers, ``16/3`` otherwise: how values appear in feedback."""
    value = Fraction(value)
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def _strip_target(expression: str, target: int | None) -> str:
    if "=" not in expression:
        return expression
    left, *rights = expression.split("=")
    right = rights[0].strip() if len(rights) == 1 else ""
    if target is None or not _INTEGER.fullmatch(right) or int(right) != target:
        wanted = "nothing" if target is None else f"'= {target}'"
        raise FormulaError(f"only {wanted} may follow the expression after an '=' sign")
    return left.strip()


def _parse(expression: str) -> ast.expr:
    try:
        return ast.parse(expression, mode="eval").body
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        # Leading zeros, unbalanced parentheses, dangling operators, "2(3)", parentheses nested too deep...
        raise FormulaError("it is not a well-formed arithmetic expression") from None


def _interpret(node: ast.expr, numbers: list[int]) -> Fraction:
    """Evaluate the whitelisted subset of Python expressions; record literals in reading order."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        numbers.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left = _interpret(node.left, numbers)
        right = _interpret(node.right, numbers)
        if isinstance(node.op, ast.Div) and right == 0:
            raise FormulaError("it divides by zero")
        return _OPERATORS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp):
        raise FormulaError("a sign must stand between two numbers; negative numbers and unary signs are not allowed")
    # What the character whitelist still lets through: "2**3", "3//2", "()" (a tuple), "(2)(3)" (a call).
    raise FormulaError("it is not made of numbers joined by the operators + - * / and parentheses")
