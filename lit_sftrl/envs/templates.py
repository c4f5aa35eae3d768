"""Replaceable wording: every prompt, feedback and answer-format text of an environment is a template.

Checkpoints trained on other prompts (the released Init checkpoints and SFT data used the original code's
wording) should be evaluated and trained on the prompts they saw. Each environment therefore keeps its
wording in a table of ``str.format`` templates with named fields (``{cards}``, ``{target}``, ...; literal
braces doubled, ``{{`` and ``}}``, as in the original code's prompt library), and takes a ``templates`` dict
that replaces any of them. The judge never reads the wording: a replaced prompt changes what the model sees,
not how its answer is graded.

Templates are checked when the environment is built, so a typo fails at construction with a message naming
the key and the fields it may use, not at the first reset of a long run.
"""

from __future__ import annotations

import string
from collections.abc import Mapping

_FORMATTER = string.Formatter()


def template_fields(text: str) -> set[str]:
    """The named fields of ``text``; positional fields, attribute or index access, conversions and format
    specs are refused (plain text with named slots is all the wording needs, and nothing else can fail or
    reach into a value at fill time)."""
    fields = set()
    for _, name, spec, conversion in _FORMATTER.parse(text):
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(f"field {{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}} "
                             "is not a plain named field like {cards}")
        fields.add(name)
    return fields


def template_table(
    defaults: Mapping[str, str], fields: Mapping[str, frozenset[str]], overrides: Mapping[str, str] | None
) -> dict[str, str]:
    """``defaults`` with ``overrides`` applied, every template checked against the fields its key may use."""
    table = dict(defaults)
    allowed_keys = ", ".join(map(repr, defaults))
    if overrides is not None and not isinstance(overrides, Mapping):
        raise ValueError(f"templates={overrides!r} is not valid; it must be a dict with keys among {allowed_keys}")
    for key, text in (overrides or {}).items():
        if key not in defaults:
            raise ValueError(f"templates key {key!r} is not valid; allowed keys: {allowed_keys}")
        if not isinstance(text, str):
            raise ValueError(f"templates[{key!r}]={text!r} is not valid; it must be a string")
        table[key] = text
    for key, text in table.items():
        try:
            unknown = template_fields(text) - fields[key]
        except ValueError as error:
            raise ValueError(f"templates[{key!r}] is not valid: {error}") from None
        if unknown:
            raise ValueError(
                f"templates[{key!r}] uses unknown field(s) {', '.join(sorted(unknown))}; it may use "
                f"{', '.join(sorted(fields[key])) or 'no fields'} (write literal braces as {{{{ and }}}})"
            )
    return table


def fill(text: str, **values: object) -> str:
    """Fill a checked template (fields it does not use are ignored)."""
    return text.format_map(values)
