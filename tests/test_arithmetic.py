"""The formula evaluator: exact values, the 24-game language only, and never anything but FormulaError."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_sftrl.envs.arithmetic import MAX_FORMULA_CHARS, FormulaError, evaluate_formula, format_number


@pytest.mark.parametrize(
    ("text", "value", "numbers"),
    [
        ("8/(3-8/3)", 24, (8, 3, 8, 3)),
        ("8 / ( 3 - 8 / 3 ) = 24", 24, (8, 3, 8, 3)),
        ("(1+2+3)*4=24", 24, (1, 2, 3, 4)),
        ("  10 *\t2 +\n4  ", 24, (10, 2, 4)),
        ("(((13)))", 13, (13,)),
        ("(" * 99 + "7" + ")" * 99, 7, (7,)),  # the length cap keeps nesting under the parser's limit of 200
        ("7/2", Fraction(7, 2), (7, 2)),
        ("2-5", -3, (2, 5)),
        ("12/4/3", 1, (12, 4, 3)),  # left associative, like the text reads
    ],
)
def test_valid_formulas_evaluate_exactly(text: str, value: Fraction, numbers: tuple[int, ...]) -> None:
    evaluation = evaluate_formula(text, target=24)
    assert evaluation.value == value and isinstance(evaluation.value, Fraction)
    assert evaluation.numbers == numbers


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("= 24", "empty"),
        ("1+2+3+18=25", "'= 24'"),
        ("24=24=24", "'= 24'"),
        ("4*6==24", "'= 24'"),
        ("24 = 4*6", "'= 24'"),
        ("2**3", "operators"),
        ("3//2", "operators"),
        ("()", "operators"),
        ("(2)(3)", "operators"),
        ("-1+25", "unary"),
        ("+24", "unary"),
        ("4*-6", "unary"),
        ("1.5*16", "illegal characters '.'"),
        ("0x18", "illegal characters 'x'"),
        ("1e2", "illegal characters 'e'"),
        ("2_4", "illegal characters '_'"),
        ("4×6", "illegal characters '×'"),
        ("__import__('os').system('true')", "illegal characters"),
        ("08+16", "well-formed"),
        ("(1+2", "well-formed"),
        ("1 2", "well-formed"),
        ("1+", "well-formed"),
        ("8/(3-3)", "divides by zero"),
        ("1+" * 100 + "1", f"longer than {MAX_FORMULA_CHARS}"),
    ],
)
def test_malformed_formulas_are_rejected_with_a_reason(text: str, reason: str) -> None:
    with pytest.raises(FormulaError) as caught:
        evaluate_formula(text, target=24)
    assert reason in str(caught.value)


def test_length_cap_is_inclusive_and_equation_needs_a_target() -> None:
    longest = "1+" * ((MAX_FORMULA_CHARS - 1) // 2) + "1"
    assert len(longest) <= MAX_FORMULA_CHARS and evaluate_formula(longest).value == len(longest) // 2 + 1
    with pytest.raises(FormulaError, match="only nothing may follow"):
        evaluate_formula("4*6=24")  # no target given: no '=' accepted


@pytest.mark.parametrize("value", [None, 24, 24.0, ["1+2"], b"1+2"])
def test_non_strings_are_malformed(value: object) -> None:
    with pytest.raises(FormulaError, match="must be a string"):
        evaluate_formula(value, target=24)


def test_format_number() -> None:
    values = (Fraction(16, 3), Fraction(-7), 5, Fraction(-1, 2))
    assert [format_number(x) for x in values] == ["16/3", "-7", "5", "-1/2"]


# -- properties ---------------------------------------------------------------------------------------------

_trees = st.recursive(
    st.integers(0, 999),
    lambda children: st.tuples(children, st.sampled_from("+-*/"), children),
    max_leaves=6,
)


def _render(tree: object, spaces: st.DataObject) -> tuple[str, Fraction | None, list[int]]:
    """Fully parenthesised text of an expression tree, its exact value (None on division by zero), leaves."""
    if isinstance(tree, int):
        return str(tree), Fraction(tree), [tree]
    left, symbol, right = tree
    (left_text, x, left_leaves), (right_text, y, right_leaves) = _render(left, spaces), _render(right, spaces)
    pad = spaces.draw(st.sampled_from(["", " ", "  "]))
    if x is None or y is None or (symbol == "/" and y == 0):
        value = None
    else:
        value = {"+": x + y, "-": x - y, "*": x * y, "/": x / y if y else None}[symbol]
    return f"({left_text}{pad}{symbol}{pad}{right_text})", value, left_leaves + right_leaves


@settings(max_examples=300, deadline=None)
@given(tree=_trees, data=st.data())
def test_random_expression_trees_evaluate_to_their_exact_value(tree: object, data: st.DataObject) -> None:
    text, value, leaves = _render(tree, data)
    if len(text) > MAX_FORMULA_CHARS:
        return
    if value is None:
        with pytest.raises(FormulaError, match="divides by zero"):
            evaluate_formula(text)
        return
    evaluation = evaluate_formula(text)
    assert evaluation.value == value and list(evaluation.numbers) == leaves


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=300), st.text(alphabet="0123456789+-*/()= .x_", max_size=80)))
def test_never_raises_anything_but_formula_error(text: str) -> None:
    try:
        evaluation = evaluate_formula(text, target=24)
    except FormulaError as error:
        assert str(error)
    else:
        assert isinstance(evaluation.value, Fraction) and all(isinstance(n, int) for n in evaluation.numbers)
