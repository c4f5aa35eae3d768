"""Config errors that fit on a screen: the key, what is wrong, and the nearest valid key for a misspelt one.

jsonargparse reports a misspelt key inside a subclass (``model.init_args.optim.lrr``) as a 20-60 line tree of
every Union member it tried, after the full usage text; the one line that matters comes last. This parser
prints that line, the dotted key it belongs to, and a suggestion.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import re
import sys
from typing import Any, NoReturn

from lightning.pytorch.cli import LightningArgumentParser


def _fields(class_path: str) -> list[str]:
    """The settings a class takes (dataclass fields or ``__init__`` parameters)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls)]
    names = []
    for klass in cls.__mro__:  # subclasses that forward **kwargs take their parents' parameters
        init = klass.__dict__.get("__init__")
        if init is not None:
            names += [p for p in inspect.signature(init).parameters if p not in ("self", "args", "kwargs")]
    return names


def _nearest(word: str, candidates: list[str]) -> str | None:
    found = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return found[0] if found else None


def short_message(message: str, options: list[str]) -> str:
    """One or two lines out of a jsonargparse error ``message``; ``options`` are the parser's option strings."""
    path = ".".join(re.findall(r'Parser key "([^"]+)"', message))
    unknown = re.search(r"(?:Option|Key) '([\w.]+)' is not accepted", message)
    if unknown:
        name = unknown.group(1)
        key = f"{path}.{name}" if path else name
        classes = re.findall(r"class_path '([\w.]+)'", message)
        near = _nearest(name.split(".")[-1], _fields(classes[-1])) if classes else None
        hint = f"; did you mean {key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{near}?" if near else ""
        return f"{key}: no such setting{hint}"
    limit = re.search(r"(a config [^\n]* is refused[^\n]*)", message)  # core.validation's YAML limits
    if limit:
        return f"{path}: {limit.group(1)}" if path else limit.group(1)
    unrecognized = re.search(r"Unrecognized arguments: (--[^\s=]+)", message, re.IGNORECASE)  # 4.48: lower case
    if unrecognized:
        near = _nearest(unrecognized.group(1), options)
        return f"unrecognized argument {unrecognized.group(1)}" + (f"; did you mean {near}?" if near else "")
    choice = re.search(r"Expected a typing\.Literal\[([^\]]*)\]\. Got value: (\S+)", message)
    if choice:
        return f"{path or 'a setting'}: {choice.group(2)!r} is not one of {choice.group(1)}"
    expected = [found for found in re.findall(r"Expected a <class '(\w+)'>\. Got value: (.*)", message)
                if found[0] != "NoneType"]
    if expected:  # the innermost type error, e.g. `--model.init_args.optim.lr nan`
        kind, value = expected[-1][0], expected[-1][1].strip()
        finite = " (a finite number is needed)" if value.lower().lstrip("+-.") in ("nan", "inf", "infinity") else ""
        return f"{path or 'a setting'}: expected a {kind}, got {value!r}{finite}"
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    noise = (r"(- )?(Expected a <class 'NoneType'>|Subtypes:|Errors:|Given value|"
             r"Does not validate against any of the Union|- Problem with given)")
    useful = [line for line in lines[1:] if not re.match(noise, line)]
    return "\n".join([f"{path}: {lines[0]}" if path else lines[0], *useful[:2]])


class ShortErrorParser(LightningArgumentParser):
    """LightningArgumentParser whose errors are :func:`short_message` plus where to find every setting."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        options = [option for action in parser._actions for option in action.option_strings]
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"{prog}: {short_message(message, options)}\n({prog} --help lists every setting)\n")
        self.exit(2)


def init_parser(**kwargs: Any) -> ShortErrorParser:
    return ShortErrorParser(**kwargs)
