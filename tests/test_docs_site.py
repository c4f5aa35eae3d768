"""The documentation site's pages stay true to the code: every key of every class the configuration reference
renders is documented in that class's docstring (the reference is generated from those docstrings, so a key
without a line there would be a key without documentation), and the README's links name files that exist."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG_REFERENCE = REPO / "docs" / "reference" / "config.md"


def rendered_classes() -> list[str]:
    return re.findall(r"^::: ([\w.]+)$", CONFIG_REFERENCE.read_text(), re.M)


def documented_names(docstring: str) -> set[str]:
    """The names of a Google-style ``Args:`` section."""
    section = docstring.split("Args:", 1)[1] if "Args:" in docstring else ""
    return set(re.findall(r"^ {4}(\w+):", section, re.M))


def test_every_key_of_the_configuration_reference_is_documented():
    classes = rendered_classes()
    assert len(classes) >= 10, classes
    undocumented = {}
    for dotted in classes:
        module, name = dotted.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name)
        keys = [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
        missing = [key for key in keys if key not in documented_names(inspect.getdoc(cls) or "")]
        if missing:
            undocumented[dotted] = missing
    assert not undocumented, f"keys without a line in their class's Args: {undocumented}"


def test_the_readme_links_name_files_that_exist():
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", (REPO / "README.md").read_text())
    local = [link for link in links if "://" not in link]
    assert len(local) >= 10, local
    missing = [link for link in local if not (REPO / link).exists()]
    assert not missing, missing
