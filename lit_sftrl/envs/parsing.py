"""Turn a model's free-form answer into a JSON object, never raising and never evaluating code.

Both environments ask for a JSON object. Models wrap it in code fences, add prose around it, or write
Python-style single-quoted dicts; all of that is accepted. Anything else yields ``None`` and a reason that
the environment turns into a reward and a feedback message.
"""

from __future__ import annotations

import ast
import json
import re
import warnings

MAX_ANSWER_CHARS = 4096
# No "\s*" before the group: with an unclosed fence it made every whitespace split a separate failed scan,
# quadratic in the answer's length (100 ms for "```" and 4,000 spaces). The body's leading space is harmless.
_FENCE = re.compile(r"```(?:json|JSON)?(.*?)```", re.DOTALL)


def extract_json_object(text: object) -> tuple[dict | None, str | None]:
    """Return ``(object, None)`` for the first JSON object in ``text``, else ``(None, reason)``.

    Keys are lower-cased and stripped so ``"Formula "`` and ``"formula"`` mean the same.
    """
    if not isinstance(text, str):
        return None, f"the answer is not text (got {type(text).__name__})"
    if len(text) > MAX_ANSWER_CHARS:
        return None, f"the answer is longer than {MAX_ANSWER_CHARS} characters"
    fenced = _FENCE.search(text)
    body = fenced.group(1) if fenced else text
    start, end = body.find("{"), body.rfind("}")
    if start < 0 or end <= start:
        return None, "the answer contains no JSON object"
    candidate = body[start : end + 1]
    parsed = _loads(candidate)
    if not isinstance(parsed, dict):
        return None, "the answer's JSON object could not be parsed"
    return {str(key).strip().lower(): value for key, value in parsed.items()}, None


def _loads(candidate: str) -> object:
    try:
        return json.loads(candidate)
    except (ValueError, RecursionError):
        pass
    try:  # single-quoted pseudo-JSON; literal_eval only builds literals, it never runs code
        with warnings.catch_warnings():  # the parser's warnings about the model's text ("invalid escape sequence
            warnings.simplefilter("ignore")  # '\\d'", "invalid decimal literal") would only litter the training log
            return ast.literal_eval(candidate)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def field_offset(text: object, key: str) -> int | None:
    """Where the answer's ``key`` field begins (the opening quote of the key), or None: the span before it is the
    answer's reasoning, which PPO may weigh differently (``thought_coef``). Any quote style and letter case."""
    if not isinstance(text, str) or len(text) > MAX_ANSWER_CHARS:
        return None
    match = re.search(r"[\"']\s*" + re.escape(key) + r"\s*[\"']\s*:", text, flags=re.IGNORECASE)
    return match.start() if match else None
