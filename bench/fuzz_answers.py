"""Arbitrary answers through both environments: no exception, no code execution, rewards from the table.

    python -m bench.fuzz_answers [--answers 100000] [--seed 0]

Every answer goes through each of three environments: GeneralPoints text (GP-L), GeneralPoints image (GP-VL)
and V-IRL text (a small synthetic metro city). Answers come from the generators below, round-robin: random
bytes decoded every which way, huge strings, deeply nested brackets, code-injection tricks (``__import__``,
lambdas, attribute access, ``9**9**9``, ``10**100000``, ``1/0``), non-ASCII, JSON of the wrong types
(NaN/Infinity, numbers as strings, lists of dicts), unbalanced parentheses, long digit strings, regex stress
for V-IRL's observation check, non-text objects, and mutated expert answers (which reach every outcome).

While answers are judged, ``eval``, ``exec``, code-producing ``compile``, ``os.system``, ``os.popen`` and
``subprocess.Popen`` are replaced by traps that record the call and raise an exception that ``except
Exception`` cannot swallow. Per-answer time is the ``step`` call alone, wall clock and thread CPU time (the
latter is immune to other processes on a loaded machine) with the garbage collector's pauses taken out: a full
collection (~20 ms in this process) can fall into any step and is no cost of the answer; the table shows both.
Prints one table and exits non-zero on any failure.
``tests/test_fuzz_answers.py`` imports this module and runs a few thousand answers.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import gc
import json
import math
import os
import random
import string
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lit_sftrl.envs.general_points import GeneralPointsEnv
from lit_sftrl.envs.parsing import MAX_ANSWER_CHARS
from lit_sftrl.envs.virl import VIRLEnv

Generator = Callable[[random.Random, Any], Any]
MAX_STEP_MS = 50.0  # the bound every answer must be judged within (thread CPU time)

# ------------------------------------------------------------------------------------------- building blocks

_CARD_LABELS = ["A", "2", "3", "4", "5", "6", "7", "8", "9", "10", "J", "Q", "K"]
_ACTIONS = [
    "forward()", "stop()", "turn_direction(north)", "turn_direction(south east)", "turn_direction(left)",
    "turn_direction(slightly right)", "Turn_Direction( 'North' )", "FORWARD()", "forward", "turn_direction()",
]
_INJECTIONS = [
    "__import__('os').system('touch /tmp/lit_sftrl_pwned')",
    "__import__(\"subprocess\").call([\"sh\", \"-c\", \"echo pwned\"])",
    "eval('24')", "exec('x = 24')", "compile('24', 'x', 'eval')", "open('/etc/passwd').read()",
    "globals()", "locals()['__builtins__']", "breakpoint()", "exit()", "quit()", "help()", "input()",
    "(lambda: 24)()", "(lambda x: x * 24)(1)", "lambda: 0", "(x := 24)", "[x for x in range(10**9)]",
    "().__class__.__bases__[0].__subclasses__()", "(24).real", "24 .__class__", "''.join", "'a' * 10**9",
    "[].__class__.__mro__[1].__subclasses__()[0].__init__.__globals__", "__builtins__.__dict__['eval']('24')",
    "f\"{__import__('os').system('id')}\"", "getattr(__builtins__, 'eval')('1')", "sys.exit(1)",
    "9**9**9", "10**100000", "2**2**2**2**2**2", "1/0", "(1-1)/(2-2)", "24//1", "24%25", "~24", "-24+48", "+24",
    "24.0", "2.4e1", "0x18", "0o30", "0b11000", "1_0+14", "24j", "True*24", "None", "\"24\"", "'24'", "24,",
    "(24,)", "[24]", "{24}", "{'a': 24}", "2 4", "24 = 24 = 24", "= 24", "24 =", "(1+2+3)*4 = 25", "(1+2+3)*4 == 24",
    "1 if 1 else 2", "not 24", "24 and 1", "24 or 1", "24 < 25", "a + b", "x", "print(24)", "del x", "import os",
    "async def f(): pass", "yield 24", "await x", "# 24", "24 # comment", "\\x32\\x34", "24;", "2\n4",
    "int('24')", "float('nan')", "float('inf')", "__debug__", "...", "Ellipsis", "b'24'", "r'24'", "u'24'",
    "{**{}}", "[*range(24)]", "((((((((((1))))))))))", "(" * 150 + "1" + ")" * 150, "(" * 30, ")" * 30,
    "((1+2)*(3+4)", "(1+2))*(3+4)", "()", "(1)(2)", "2(3)", "2*-3", "--24", "0024", "00", "0", "0/0",
]
_UNICODE_BLOCKS = [
    (0x0000, 0x001F), (0x0080, 0x00FF), (0x0370, 0x03FF), (0x0400, 0x04FF), (0x0590, 0x05FF), (0x0600, 0x06FF),
    (0x0900, 0x097F), (0x0300, 0x036F), (0x2000, 0x206F), (0x2190, 0x22FF), (0x3000, 0x303F), (0x4E00, 0x4FFF),
    (0xD800, 0xDFFF), (0xE000, 0xE0FF), (0xFF00, 0xFFEF), (0xFFF0, 0xFFFF), (0x1D400, 0x1D7FF), (0x1F300, 0x1F6FF),
    (0x10FFF0, 0x10FFFF),
]
_LOOKALIKES = [
    "２４", "（１＋２＋３）×４", "𝟐𝟒", "٢٤", "२४", "24\u200b", "\u202e42", "1\u2003+\u30002", "1\x1c+\x1d2", "１+２",
    "(1+2+3)\u00d74", "(1+2+3)\u22174", "1\u22122", "6\u00f73", "\ufeff24", "2\u00044", "24\x00",
]
_HUGE_CACHE: list[str] = []


def _log_length(rng: random.Random, high: int) -> int:
    """A length spread evenly over orders of magnitude, from 0 to ``high``."""
    return min(high, int(math.exp(rng.uniform(0, math.log(high + 1)))) - 1 + rng.randint(0, 1))


def _random_unicode(rng: random.Random, length: int) -> str:
    chars = []
    for _ in range(length):
        low, high = rng.choice(_UNICODE_BLOCKS)
        chars.append(chr(rng.randint(low, high)))
    return "".join(chars)


def _cards(rng: random.Random) -> list[str]:
    return [rng.choice(_CARD_LABELS) for _ in range(rng.choice([0, 1, 3, 4, 4, 4, 5, 8]))]


def _answer(rng: random.Random, formula: Any, **extra: Any) -> str:
    """A GeneralPoints-shaped JSON answer that also carries V-IRL keys, so both envs read a field from it."""
    fields = {"cards": _cards(rng), "number": [rng.randint(1, 13) for _ in range(4)], "formula": formula,
              "current observation": rng.choice(["No landmark nearby", "You observe an intersection", ""]),
              "action": formula if rng.random() < 0.5 else rng.choice(_ACTIONS)}
    fields.update(extra)
    return json.dumps(fields, ensure_ascii=rng.random() < 0.5, allow_nan=True)


def _huge_strings() -> list[str]:
    if not _HUGE_CACHE:
        brace = '{"cards": ["A", "2", "3", "4"], "formula": "1+2+3+4"}'
        _HUGE_CACHE.extend([
            "A" * 10**6,
            "{" * 10**5,
            "[" * 5 * 10**5 + "]" * 5 * 10**5,
            '{"formula": "' + "1+" * 10**5 + '1"}',
            "9" * 10**6,
            "x" * MAX_ANSWER_CHARS,
            "x" * (MAX_ANSWER_CHARS + 1),
            brace + " " * (MAX_ANSWER_CHARS - len(brace)),
            brace + " " * (MAX_ANSWER_CHARS - len(brace) + 1),
            "```json\n" * 20000,
            "```" + brace * 1000,
            ("no " * 2000 + "intersection")[:MAX_ANSWER_CHARS],
            '{"action": "' + "forward()" * 400 + '"}',
            '{"current observation": "' + "not " * 1000 + 'intersection", "action": "stop()"}',
            "\\" * 10**5,
            "\ud800" * 10**5,
            "\x00" * 10**5,
            "🎴" * 10**5,
        ])
    return _HUGE_CACHE


def _mutate(rng: random.Random, text: str) -> str:
    """A few random edits: delete, insert nasty text, replace a character, swap case, duplicate a slice."""
    for _ in range(rng.randint(1, 4)):
        if not text:
            return rng.choice(_INJECTIONS)
        i = rng.randrange(len(text))
        j = min(len(text), i + rng.randint(1, 8))
        kind = rng.randrange(6)
        if kind == 0:
            text = text[:i] + text[j:]
        elif kind == 1:
            inserted = rng.choice(_INJECTIONS + _LOOKALIKES + ["{", "}", "[", "]", '"', "'", "\\", "```"])
            text = text[:i] + inserted + text[i:]
        elif kind == 2:
            text = text[:i] + rng.choice(string.printable + "\u00a0\u2028é中") + text[i + 1 :]
        elif kind == 3:
            text = text[:i] + text[i:j].swapcase() + text[j:]
        elif kind == 4:
            text = text[:j] + text[i:j] * rng.randint(1, 50) + text[j:]
        else:
            text = text.replace(rng.choice(["24", "4", "1", "(", "forward", "north", "intersection", "cards"]),
                                rng.choice(["25", "", "((", "Forward", "North", "Intersection", "Cards", "١"]))
    return text


# ------------------------------------------------------------------------------------------- the generators


def random_bytes(rng: random.Random, env: Any) -> str:
    data = rng.randbytes(_log_length(rng, 6000))
    encoding, errors = rng.choice([("utf-8", "replace"), ("utf-8", "surrogateescape"), ("utf-8", "ignore"),
                                   ("latin-1", "strict"), ("utf-16", "replace"), ("cp1252", "replace")])
    text = data.decode(encoding, errors)
    return rng.choice([text, "{" + text + "}", _answer(rng, text), '{"formula": "' + text + '"}'])


def printable_soup(rng: random.Random, env: Any) -> str:
    """Random text over the characters that JSON, Python literals and formulas care about."""
    alphabet = '{}[]()":,\'0123456789+-*/= .eE\\nNaINfinitytrueflsoam_' + "\t\n"
    body = "".join(rng.choice(alphabet) for _ in range(_log_length(rng, 400)))
    return rng.choice([body, "{" + body + "}", '{"formula": "' + body + '"}', "{'formula': " + body + "}"])


def huge(rng: random.Random, env: Any) -> str:
    return rng.choice(_huge_strings())


def nested_brackets(rng: random.Random, env: Any) -> str:
    depth = _log_length(rng, 2000)
    open_, close = rng.choice([("[", "]"), ("{", "}"), ("(", ")"), ('{"a": ', "}"), ("{'a': ", "}"), ("[{", "}]")])
    unbalanced = rng.random() < 0.3
    nest = (
        open_ * depth + rng.choice(["1", "", '"x"', "24"])
        + close * (depth - (rng.randint(1, depth) if unbalanced and depth else 0))
    )
    formula_depth = rng.randint(0, 120)
    formula = (
        "(" * formula_depth + "1+2+3+4" + ")" * (formula_depth if not unbalanced else rng.randint(0, formula_depth))
    )
    return rng.choice([
        nest,
        '{"cards": ' + nest + ', "formula": "1+2"}',
        "{'cards': " + nest + ", 'formula': '1+2'}",
        _answer(rng, formula),
        '{"action": ' + nest + "}",
        nest[: len(nest) // 2] + _answer(rng, "1+2") + nest[len(nest) // 2 :],
    ])


def code_injection(rng: random.Random, env: Any) -> str:
    code = rng.choice(_INJECTIONS)
    return rng.choice([
        code,
        _answer(rng, code),
        "{'formula': " + code + ", 'cards': ['A'], 'action': " + code + "}",
        "{'formula': '1+2', 'cards': [" + code + "]}",
        "{'current observation': " + code + ", 'action': 'forward()'}",
        code + ' or {"formula": "1+2"}',
        '{"formula": "' + code.replace('"', "'") + ' = 24"}',
        "```python\n" + code + "\n```",
        "```json\n{\"formula\": \"" + code.replace('"', "'") + "\"}\n```",
    ])


def wrong_types(rng: random.Random, env: Any) -> str:
    odd = rng.choice([
        None, True, False, 0, -0.0, 24, 24.0, "24", float("nan"), float("inf"), float("-inf"), 10**300, -(10**300),
        [], {}, [{"a": 1}, {"b": [2]}], ["1", "2", "3", "4"], [[1, 2], [3, 4]], {"formula": "1+2"}, [None] * 4,
        "NaN", "Infinity", "1e999", "-1", "", " ", "\x00", [float("nan")] * 4, {"": ""}, list(range(100)),
    ])
    key = rng.choice(["formula", "cards", "number", "action", "current observation", "FORMULA", " Formula ", "Action",
                      "current_observation", "", "cards "])
    fields = {"cards": ["A", "2", "3", "4"], "number": [1, 2, 3, 4], "formula": "(1+2+3)*4", "action": "forward()"}
    fields[key] = odd
    text = json.dumps(fields, allow_nan=True)
    return rng.choice([
        text,
        json.dumps(odd, allow_nan=True),
        text.replace("NaN", rng.choice(["NaN", "nan", "-NaN", "Infinity", "-Infinity", "1e99999", "-1e99999"])),
        '{"formula": "1+2", "formula": ' + json.dumps(odd, allow_nan=True) + "}",
        repr(fields),
        '{"cards": ["A", "2"], "formula": 1e' + str(rng.randint(300, 10**6)) + "}",
        '{"number": [' + "9" * rng.randint(1, 4000) + '], "formula": "1"}',
    ])


def long_digits(rng: random.Random, env: Any) -> str:
    digits = "".join(rng.choice(string.digits) for _ in range(_log_length(rng, 5000)))
    op = rng.choice("+-*/")
    formula = rng.choice([digits, digits[:199], f"{digits[:99]}{op}{digits[:99]}",
                          f"{digits[:60]}*{digits[:60]}*{digits[:60]}",
                          "9*" * 99 + "9", "9/" * 99 + "9", "1+" * 99 + "1", "(" * 49 + "9*9" + ")" * 49])
    return rng.choice([digits, _answer(rng, formula), '{"cards": [' + digits[:4000] + '], "formula": "1+2"}'])


def non_ascii(rng: random.Random, env: Any) -> str:
    text = _random_unicode(rng, _log_length(rng, 500))
    formula = rng.choice(_LOOKALIKES + [text[:100]])
    return rng.choice([
        text,
        _answer(rng, formula),
        _answer(rng, "1+2+3+4", cards=[text[:3], "２", "Ａ", "10"]),
        '{"formula": "' + formula + '", "action": "turn_direction(' + text[:10] + ')"}',
        "{" + text + "}",
        '{"' + text[:20] + '": "' + text[20:40] + '"}',
    ])


def regex_stress(rng: random.Random, env: Any) -> str:
    """Inputs aimed at the regular expressions: V-IRL's negated-intersection check, the fence and the formula."""
    n = _log_length(rng, 900)
    observation = rng.choice([
        "no " + "word " * n + "intersection", "not " * n + "intersection", "no" + " " * (n * 4) + "intersection",
        "intersection " * n, "no intersection " * n, ("a" * n + " ") * 3 + "intersection", "\u00a0no\u00a0" * n,
        "No" + "\t\n" * n + "Intersection",
    ])
    action = rng.choice([
        "turn_direction(" + " " * n + "north" + " " * n + ")", "'\"`" * n + "forward()", "(" * n + "_" * n,
    ])
    long = _log_length(rng, MAX_ANSWER_CHARS - 24)  # an unclosed fence, then whitespace: was quadratic
    return rng.choice([
        json.dumps({"current observation": observation, "action": action})[:MAX_ANSWER_CHARS],
        "```" * n + "{}",
        "```json" + rng.choice([" ", "\n", "\t "]) * long + "{\"formula\": \"1\"}",
        "```" + " " * long + rng.choice(["x", "}", "```", "{"]),
        '{"formula": "' + " " * n + "1" + " " * n + '"}',
        '{"formula": "' + "1 " * 99 + '"}',
    ])


def non_text(rng: random.Random, env: Any) -> Any:
    """Not a string at all (a rollout engine bug): still judged, never raises."""
    deep: Any = []
    for _ in range(rng.choice([1, 10, 5000])):
        deep = [deep]
    return rng.choice([None, 0, 24, 24.0, float("nan"), True, b'{"formula": "1+2"}', bytearray(b"24"),
                       {"formula": "1+2+3+4", "cards": ["A", "2", "3", "4"]}, ["24"], ("24",), deep, object(), 1j])


def near_valid(rng: random.Random, env: Any) -> str:
    """The expert's answer, often mutated: reaches every outcome of the reward table, success included."""
    text = env.expert_answer()
    if rng.random() < 0.25:
        return text
    if rng.random() < 0.2 and hasattr(env, "suboptimal_answer"):
        return env.suboptimal_answer()
    if rng.random() < 0.15:
        return rng.choice([
            "Sure! Here it is:\n```json\n" + text + "\n```", text.replace('"', "'"), text + text, "[" + text + "]",
        ])
    return _mutate(rng, text)


GENERATORS: dict[str, Generator] = {
    gen.__name__: gen
    for gen in (random_bytes, printable_soup, huge, nested_brackets, code_injection, wrong_types, long_digits,
                non_ascii, regex_stress, non_text, near_valid)
}
# The nastiest, for the property test and the quick CI run.
NASTIEST = ("huge", "nested_brackets", "code_injection", "wrong_types", "non_text")


# ------------------------------------------------------------------------------------------- guarding and running


class CodeExecuted(BaseException):
    """Raised by the traps; a BaseException, so that no ``except Exception`` in the code under test hides it."""


class CodeTraps:
    """Traps for eval/exec, compile to code objects (``ast.parse`` compiles to an AST only: allowed), os.system,
    os.popen and subprocess.Popen. Installed for a whole run but armed only around ``step`` (generating
    answers imports codecs, which execs their modules); ``calls`` lists what was trapped."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.armed = False
        self._saved: list[tuple[Any, str, Any]] = []

    def _trap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def trapped(*args: Any, **kwargs: Any) -> Any:
            if not self.armed:
                return original(*args, **kwargs)
            self.calls.append(f"{name}{tuple(repr(a)[:80] for a in args)}")
            raise CodeExecuted(name)

        return trapped

    def _compile(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def compile_ast_only(source: Any, filename: Any, mode: str, flags: int = 0, *args: Any, **kwargs: Any) -> Any:
            if self.armed and not flags & ast.PyCF_ONLY_AST:
                self.calls.append(f"compile({repr(source)[:80]}, {mode!r})")
                raise CodeExecuted("compile")
            return original(source, filename, mode, flags, *args, **kwargs)

        return compile_ast_only

    def __enter__(self) -> CodeTraps:
        targets = [(builtins, "eval"), (builtins, "exec"), (builtins, "compile"), (os, "system"), (os, "popen"),
                   (subprocess, "Popen")]
        self._saved = [(owner, name, getattr(owner, name)) for owner, name in targets]
        for owner, name, original in self._saved:
            label = name if owner is builtins else f"{owner.__name__}.{name}"
            setattr(owner, name, self._compile(original) if name == "compile" else self._trap(label, original))
        return self

    def __exit__(self, *exc: Any) -> None:
        for owner, name, original in self._saved:
            setattr(owner, name, original)
        self.armed = False


def make_envs(folder: str | Path) -> dict[str, Any]:
    """GP-L, GP-VL and V-IRL-L (a 3-route metro city written into ``folder``), each reset once."""
    from lit_sftrl.envs.city import make_city

    routes = make_city(Path(folder) / "metro", "metro", num_routes=3, seed=0, pano_width=256)
    envs = {
        "gp_text": GeneralPointsEnv(modality="text"),
        "gp_image": GeneralPointsEnv(modality="image"),
        "virl_text": VIRLEnv(str(routes)),
    }
    for seed, env in enumerate(envs.values()):
        env.reset(seed=seed)
    return envs


@dataclass
class FuzzStats:
    """What one environment made of the answers it was given."""

    answers: int = 0
    exceptions: list[str] = field(default_factory=list)
    bad_rewards: list[str] = field(default_factory=list)
    wall_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)  # thread CPU time of step(), garbage collection excluded
    max_cpu_with_gc_ms: float = 0.0
    rewards: Counter = field(default_factory=Counter)
    outcomes: Counter = field(default_factory=Counter)
    slowest: tuple[float, str, str] = (0.0, "", "")  # cpu ms, generator, answer (cut)

    @property
    def max_cpu_ms(self) -> float:
        return max(self.cpu_ms, default=0.0)

    @property
    def mean_cpu_ms(self) -> float:
        return sum(self.cpu_ms) / max(len(self.cpu_ms), 1)

    @property
    def max_wall_ms(self) -> float:
        return max(self.wall_ms, default=0.0)

    @property
    def mean_wall_ms(self) -> float:
        return sum(self.wall_ms) / max(len(self.wall_ms), 1)


class GcClock:
    """Thread CPU time spent in the garbage collector, accumulated through ``gc.callbacks``."""

    def __init__(self) -> None:
        self.total_ns = 0
        self._start: int | None = None

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.thread_time_ns()
        elif self._start is not None:
            self.total_ns += time.thread_time_ns() - self._start
            self._start = None

    def __enter__(self) -> GcClock:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        gc.callbacks.remove(self)


def _describe(answer: Any) -> str:
    if isinstance(answer, str):
        return repr(answer[:120]) + (f"... ({len(answer)} chars)" if len(answer) > 120 else "")
    return f"<{type(answer).__name__}>"


def expected_reward(env: Any, info: dict) -> float | None:
    """The reward table's entry for the judged outcome, plus the budget penalty on the attempt that used the
    budget up (the paper's MDP); None for an outcome the table lacks."""
    base = env.rewards.get(info.get("outcome"))
    if base is None:
        return None
    return base + (env.rewards["budget_exhausted"] if info.get("budget_exhausted") else 0.0)


def fuzz_env(
    env: Any, answers: int, seed: int, generators: dict[str, Generator] | None = None, traps: CodeTraps | None = None
) -> FuzzStats:
    """Feed ``answers`` generated answers to ``env`` (reset whenever an episode ends); ``traps`` armed per step."""
    generators = generators or GENERATORS
    names = list(generators)
    rng = random.Random(seed)
    stats = FuzzStats()
    episode = 0
    with GcClock() as gc_clock:
        for i in range(answers):
            name = names[i % len(names)]
            answer = generators[name](rng, env)
            if traps is not None:
                traps.armed = True
            wall, cpu, in_gc = time.perf_counter_ns(), time.thread_time_ns(), gc_clock.total_ns
            try:
                _, reward, terminated, truncated, info = env.step(answer)
            except Exception as error:  # noqa: BLE001 - the point is to count them
                stats.exceptions.append(f"{name}: {type(error).__name__}: {str(error)[:200]} <- {_describe(answer)}")
                terminated = True
            else:
                cpu_ms, wall_ms = (time.thread_time_ns() - cpu) / 1e6, (time.perf_counter_ns() - wall) / 1e6
                stats.max_cpu_with_gc_ms = max(stats.max_cpu_with_gc_ms, cpu_ms)
                cpu_ms -= (gc_clock.total_ns - in_gc) / 1e6
                stats.answers += 1
                stats.cpu_ms.append(cpu_ms)
                stats.wall_ms.append(wall_ms)
                if cpu_ms > stats.slowest[0]:
                    stats.slowest = (cpu_ms, name, _describe(answer))
                stats.rewards[reward] += 1
                stats.outcomes[info.get("outcome")] += 1
                if expected_reward(env, info) != reward or not math.isfinite(reward):
                    stats.bad_rewards.append(
                        f"{name}: reward {reward!r}, outcome {info.get('outcome')!r} <- {_describe(answer)}"
                    )
            finally:
                if traps is not None:
                    traps.armed = False
            if terminated or truncated:
                env.reset(seed=seed * 1_000_003 + episode)
                episode += 1
    return stats


def warm_up(env: Any) -> None:
    """Judge the deepest nestings once before timing: the first deep recursion of a process grows its C stack
    (page faults, ~30 ms once), which is no cost of any answer."""
    for depth in (990, 1500):
        for open_, close in (("[", "]"), ('{"a": ', "}")):
            nested = open_ * depth + close * depth
            for answer in ('{"action": ' + nested + "}", "{'a': " + nested + "}"):
                if env.step(answer)[2:4] != (False, False):
                    env.reset(seed=0)
    env.reset(seed=0)


def run(
    answers: int, seed: int, folder: str | Path, generators: dict[str, Generator] | None = None
) -> tuple[dict[str, FuzzStats], list[str]]:
    """Every answer through every environment, under the code-execution traps."""
    envs = make_envs(folder)
    _huge_strings()
    for env in envs.values():
        warm_up(env)
    results = {}
    with CodeTraps() as traps:
        for offset, (name, env) in enumerate(envs.items()):
            results[name] = fuzz_env(env, answers, seed + offset, generators, traps)
    return results, traps.calls


def format_report(results: dict[str, FuzzStats], calls: list[str]) -> str:
    lines = [f"{'environment':<10} {'answers':>8} {'exceptions':>10} {'bad reward':>10} {'max ms':>8} {'mean ms':>8} "
             f"{'max+gc':>8} {'max wall':>8} {'mean wall':>9}  reward histogram"]
    for name, stats in results.items():
        histogram = ", ".join(f"{reward:+g}: {count}" for reward, count in sorted(stats.rewards.items()))
        lines.append(f"{name:<10} {stats.answers:>8} {len(stats.exceptions):>10} {len(stats.bad_rewards):>10} "
                     f"{stats.max_cpu_ms:>8.2f} {stats.mean_cpu_ms:>8.3f} {stats.max_cpu_with_gc_ms:>8.2f} "
                     f"{stats.max_wall_ms:>8.2f} {stats.mean_wall_ms:>9.3f}  {histogram}")
    lines.append("ms: one step(), thread CPU time without garbage-collector pauses; max+gc: with them; "
                 "wall: wall clock, which other processes inflate")
    for name, stats in results.items():
        outcomes = ", ".join(f"{k}: {v}" for k, v in stats.outcomes.most_common())
        lines.append(f"{name} outcomes: {outcomes}")
        lines.append(f"{name} slowest: {stats.slowest[0]:.2f} ms from {stats.slowest[1]}: {stats.slowest[2][:100]}")
        for problem in (stats.exceptions + stats.bad_rewards)[:5]:
            lines.append(f"  PROBLEM {problem}")
    lines.append(f"code-execution traps triggered: {len(calls)}" + "".join(f"\n  {call}" for call in calls[:5]))
    return "\n".join(lines)


def failures(results: dict[str, FuzzStats], calls: list[str], max_ms: float = MAX_STEP_MS) -> list[str]:
    problems = list(calls)
    for name, stats in results.items():
        problems += [f"{name}: {p}" for p in stats.exceptions + stats.bad_rewards]
        if stats.max_cpu_ms >= max_ms:
            problems.append(f"{name}: slowest answer took {stats.slowest[0]:.1f} ms "
                            f"({stats.slowest[1]}: {stats.slowest[2][:80]})")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers", type=int, default=100_000, help="answers per environment")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-ms", type=float, default=MAX_STEP_MS, help="bound on one answer's thread CPU time")
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        results, calls = run(args.answers, args.seed, folder)
    print(format_report(results, calls))
    print(f"{args.answers} answers x {len(results)} environments in {time.perf_counter() - start:.0f} s; "
          f"generators: {', '.join(GENERATORS)}")
    problems = failures(results, calls, args.max_ms)
    if problems:
        sys.exit(f"FAILED: {len(problems)} problems")


if __name__ == "__main__":
    main()
