"""A fresh install gets what was tested: the README's commands and CI install through the lock, the lock pins
every dependency within pyproject's ranges, and the drift script reads versions and failures right."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / ".ci"))  # .ci/drift.py is a standalone script, not part of any package
import drift  # noqa: E402

tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def _readme_setup_commands() -> list[str]:
    return [line for line in (REPO / "README.md").read_text().splitlines()
            if line.startswith("python3 -m venv") and "pip install" in line]


def test_the_readme_commands_and_ci_install_through_the_lock():
    commands = _readme_setup_commands()
    assert len(commands) >= 2 and any(c.endswith("pytest") for c in commands), commands
    ci = (REPO / ".ci" / "run").read_text()
    for command in commands:
        project_install = re.search(r"pip install (.*?-e \S+)", command).group(1)
        assert "-c constraints.txt" in project_install, command
    assert "pip install -q -c constraints.txt -e '.[test]'" in ci


def test_the_lock_pins_every_dependency_inside_its_range():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    pins = drift.read_pins((REPO / "constraints.txt").read_text())
    problems = []
    for requirement in requirements:
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        if name == "torch":  # installed first by its own command, never through the lock
            assert "torch" not in pins
            continue
        if name not in pins:
            problems.append(f"{name}: not in constraints.txt")
        elif not requirement.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{name}: locked {pins[name]} outside {requirement.specifier}")
    assert not problems, "; ".join(problems) + " (regenerate: python .ci/drift.py --write-lock)"


def test_drift_lists_changed_new_and_gone_packages():
    locked = drift.read_pins("# header\nkernels==0.18.0\nLightning==2.6.6\nold_pkg==1.0\n-e file:///x\n")
    found = drift.read_pins("kernels==0.19.1\nlightning==2.6.6\nnew-pkg==2.0\n")
    assert locked == {"kernels": "0.18.0", "lightning": "2.6.6", "old-pkg": "1.0"}
    assert drift.changes(locked, found) == ["kernels: 0.18.0 -> 0.19.1", "new-pkg: new, 2.0", "old-pkg: gone (was 1.0)"]


def test_drift_names_the_tests_that_broke():
    output = ("..F.\nFAILED tests/test_progress.py::test_a_fit - AssertionError: x\n"
              "ERROR tests/test_cli.py::test_help\n1 failed, 1 error, 3 passed in 2.0s\n")
    assert drift.failed_tests(output) == ["tests/test_progress.py::test_a_fit", "tests/test_cli.py::test_help"]
