"""The behaviour spec lives in the repository, and nothing points outside it (a user's clone has no ../shared)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_nothing_points_outside_the_repository():
    outside = re.compile(r"\.\./shared|(?<![\w/])(SPEC|STACK)\.md|SPEC §")
    offenders = []
    for path in [REPO / "README.md", *REPO.glob("docs/**/*.md"), *REPO.glob("lit_sftrl/**/*.py"),
                 *REPO.glob("bench/**/*.py"), *REPO.glob("tests/**/*.py"), *REPO.glob("configs/**/*.yaml")]:
        if path.name == "test_docs.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if outside.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:100]}")
    assert not offenders, "\n".join(offenders)


def test_the_spec_sections_that_docstrings_cite_exist():
    spec = (REPO / "docs" / "spec.md").read_text()
    sections = {int(n) for n in re.findall(r"^## (\d+)\.", spec, re.M)}
    cited = set()
    for path in REPO.glob("lit_sftrl/**/*.py"):
        cited |= {int(n) for n in re.findall(r"docs/spec\.md §(\d+)", path.read_text())}
    assert cited and cited <= sections, (cited, sections)
    assert (REPO / "docs" / "stack.md").is_file()
