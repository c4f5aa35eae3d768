"""Reliability drill: arbitrary answers through GeneralPoints (text and image) and V-IRL (text).

No answer may raise, run code (eval/exec/compile-to-code/os.system/subprocess are trapped while an answer is
judged), earn a reward outside the environment's table, or hang the judge (here: 2 s of CPU; the bench holds
every answer to 50 ms). The generators live in
``bench/fuzz_answers.py``, which runs the full 100,000 answers; here a few thousand, plus hypothesis properties
over the nastiest shapes and regressions for what the fuzzer found.
"""

from __future__ import annotations

import builtins
import json
import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import fuzz_answers as fuzz
from lit_sftrl.envs.general_points import GeneralPointsEnv
from lit_sftrl.envs.parsing import MAX_ANSWER_CHARS, extract_json_object

QUICK_ANSWERS = 1500  # per environment; ~2 s each on a quiet core


@pytest.fixture(scope="module")
def envs(tmp_path_factory):
    built = fuzz.make_envs(tmp_path_factory.mktemp("fuzz"))
    for env in built.values():
        fuzz.warm_up(env)
    return built


def test_traps_catch_eval_exec_and_code_compile_but_not_ast_parse():
    import ast

    with fuzz.CodeTraps() as traps:
        traps.armed = True
        for call in (
            lambda: builtins.eval("1"), lambda: builtins.exec("x = 1"), lambda: builtins.compile("1", "f", "eval")
        ):
            with pytest.raises(fuzz.CodeExecuted):
                call()
        assert isinstance(ast.parse("1 + 2", mode="eval"), ast.Expression)  # AST only: allowed
        assert ast.literal_eval("{'a': [1, 2]}") == {"a": [1, 2]}
        traps.armed = False
        assert builtins.eval("1 + 1") == 2  # disarmed: the real ones
    assert len(traps.calls) == 3
    assert builtins.eval is eval and builtins.exec is exec  # restored


def test_thousands_of_arbitrary_answers(envs, capsys):
    """Every generator, round-robin, through all three environments under the code-execution traps."""
    results = {}
    with fuzz.CodeTraps() as traps:
        for offset, (name, env) in enumerate(envs.items()):
            results[name] = fuzz.fuzz_env(env, QUICK_ANSWERS, seed=100 + offset, traps=traps)
    report = fuzz.format_report(results, traps.calls)
    with capsys.disabled():
        print("\n" + report)
    assert not traps.calls, traps.calls
    assert fuzz.failures(results, traps.calls) == [], report
    for name, stats in results.items():
        assert stats.answers == QUICK_ANSWERS
        table = envs[name].rewards
        assert set(stats.rewards) <= {*table.values(), *(r + table["budget_exhausted"] for r in table.values())}
        # The mutated expert answers reach the top reward, so the judge is not just saying "malformed".
        assert stats.rewards[max(envs[name].rewards.values())] > 0, name


# ------------------------------------------------------------------------------------------- properties


def _judge_everywhere(envs, answer) -> None:
    """One answer through every environment, traps armed only inside step()."""
    with fuzz.CodeTraps() as traps:
        for env in envs.values():
            traps.armed = True
            start = time.thread_time_ns()
            try:
                _, reward, terminated, truncated, info = env.step(answer)
            finally:
                traps.armed = False
            elapsed_ms = (time.thread_time_ns() - start) / 1e6
            assert reward == fuzz.expected_reward(env, info)
            assert elapsed_ms < HANG_MS, (elapsed_ms, repr(answer)[:200])
            assert info["outcome"] in env.rewards
            if terminated or truncated:
                env.reset(seed=0)
    assert not traps.calls, traps.calls


# A guard against answers that hang the judge (catastrophic backtracking, huge powers), not a speed target: one-off
# costs (the GP solution table is built on a process's first hand, ~0.5 s) and GC pauses land inside single steps.
# The speed bound (fuzz.MAX_STEP_MS, 50 ms) is measured over 100,000 answers by bench/fuzz_answers.py.
HANG_MS = 2000.0
_PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30)
)
_json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
_fields = st.fixed_dictionaries({}, optional={
    "cards": _json_values, "number": _json_values,
    "formula": _json_values | st.text(alphabet="0123456789+-*/()= .eEj_x", max_size=60),
    "action": _json_values, "current observation": _json_values,
})


@_PROPERTY
@given(text=st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("utf-8", "surrogateescape")))
def test_property_any_text(envs, text):
    _judge_everywhere(envs, text)


@_PROPERTY
@given(
    fields=_fields, python_style=st.booleans(),
    wrap=st.sampled_from(["{}", "```json\n{}\n```", "Answer: {} done", "[{}]"]),
)
def test_property_json_of_any_types(envs, fields, python_style, wrap):
    body = repr(fields) if python_style else json.dumps(fields, allow_nan=True)
    _judge_everywhere(envs, wrap.replace("{}", body, 1))


@_PROPERTY
@given(
    depth=st.integers(0, 3000),
    brackets=st.sampled_from([("[", "]"), ("{", "}"), ("(", ")"), ("[{", "}]"), ('{"a": ', "}"), ("{'a': ", "}")]),
    missing=st.integers(0, 5),
    where=st.sampled_from(["bare", "cards", "formula", "action"]),
)
def test_property_deeply_nested_brackets(envs, depth, brackets, missing, where):
    opening, closing = brackets
    nest = opening * depth + "1" + closing * max(depth - missing, 0)
    if where == "bare":
        answer = nest
    elif where == "formula":
        answer = json.dumps({"cards": ["A", "2", "3", "4"], "formula": nest[:MAX_ANSWER_CHARS]})
    else:
        answer = '{"' + where + '": ' + nest + ', "formula": "1+2"}'
    _judge_everywhere(envs, answer)


@_PROPERTY
@given(code=st.sampled_from(fuzz._INJECTIONS), template=st.integers(0, 8), seed=st.integers(0, 2**16))
def test_property_code_injection(envs, code, template, seed):
    rng = random.Random(seed)
    answers = [
        code, fuzz._answer(rng, code), "{'formula': " + code + ", 'action': " + code + "}",
        "{'formula': '1+2', 'cards': [" + code + "]}", code + ' or {"formula": "1+2"}',
        '{"formula": "' + code.replace('"', "'") + ' = 24"}', "```python\n" + code + "\n```",
        json.dumps({"action": code, "current observation": code}), '{"formula": "' + code.replace('"', "'") * 20 + '"}',
    ]
    _judge_everywhere(envs, answers[template])


@_PROPERTY
@given(value=st.one_of(st.none(), st.integers(), st.floats(allow_nan=True), st.binary(max_size=50), _json_values,
                       st.integers(1, 6000).map(lambda d: _nested_list(d))))
def test_property_non_text_answers(envs, value):
    _judge_everywhere(envs, value)


def _nested_list(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


# ------------------------------------------------------------------------------------------- regressions


def test_deeply_nested_non_text_answer_does_not_raise():
    """Found by the fuzzer: the revision turn used repr(), which raises RecursionError on a deep list."""
    env = GeneralPointsEnv()
    env.reset(seed=0)
    obs, reward, *_ = env.step(_nested_list(5000))
    assert reward == env.rewards["illegal"]
    assert len(obs["messages"][-2]["content"]) < 300  # a bounded repr, not the whole structure


@pytest.mark.parametrize("answer", [
    "```json" + " " * (MAX_ANSWER_CHARS - 8) + "x",
    "```" + "\n" * (MAX_ANSWER_CHARS - 4) + "{",
    "```JSON" + "\t" * (MAX_ANSWER_CHARS - 30) + '{"formula": "1"}',
])
def test_unclosed_code_fence_is_linear(answer):
    """Found by the fuzzer: ``` then thousands of spaces made the fence regex quadratic (100 ms per answer)."""
    extract_json_object(answer)  # warm the regex cache
    start = time.thread_time_ns()
    for _ in range(10):
        extract_json_object(answer)
    assert (time.thread_time_ns() - start) / 1e6 / 10 < 25.0  # linear: ~1 ms; the quadratic regex took 100 ms


def test_fenced_answers_still_parse():
    assert extract_json_object('Here:\n```json\n{"formula": "1+2"}\n```')[0] == {"formula": "1+2"}
    assert extract_json_object('```JSON{"a": 1}``` then {"b": 2}')[0] == {"a": 1}
    assert extract_json_object('```\n{"a": 1}\n```')[0] == {"a": 1}


def test_parser_warnings_stay_out_of_the_log():
    """Model text such as '\\d' or '1e5x' makes Python's parser warn; judging it must not print anything."""
    import warnings

    env = GeneralPointsEnv()
    env.reset(seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for answer in [
            "{'formula': '\\d'}", "{'a': 1e5x}", "{'cards': ['\\K'], 'formula': '1'}", '{"formula": "2(3)"}',
        ]:
            env.step(answer)
            env.reset(seed=0)
    assert [str(w.message) for w in caught] == []
