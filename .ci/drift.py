"""Hear about dependency drift before users do: the newest versions pyproject.toml allows, in a fresh venv, tested.

    python .ci/drift.py                      # newest allowed versions + the whole suite; report what changed
    python .ci/drift.py -- tests/test_cli.py # the same, a part of the suite
    python .ci/drift.py --write-lock         # and, when the suite passes, make those versions the new lock

The lock, ``constraints.txt``, holds the exact versions the suite last passed with; the README's commands and
``.ci/run`` install through it, so a fresh machine gets what was tested. This script installs without it (the
newest release of everything ``pyproject.toml`` allows, as a user installing the package into their own
environment gets), lists every package whose version differs from the lock, runs the suite and says which tests
broke. Run it when updating the lock, and at least monthly (the docs say so). Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "constraints.txt"
TORCH = "torch==2.13.0"  # installed first, as in the README: a looser requirement pulls a multi-GB CUDA build
EXTRAS = "test,docs,bench"
LOCK_HEADER = """\
# The exact versions the test suite last passed with (torch is installed first, as the README says, and is not
# listed). Regenerate: python .ci/drift.py --write-lock   (a fresh venv, the newest allowed versions, the suite)
"""


def read_pins(text: str) -> dict[str, str]:
    """``name==version`` lines -> {normalised name: version}; comments, editables and blank lines skipped."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line and not line.startswith("-"):
            name, version = line.split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return pins


def changes(locked: dict[str, str], found: dict[str, str]) -> list[str]:
    """One line per package that differs: changed versions, then packages new to or gone from the lock."""
    lines = [f"{name}: {locked[name]} -> {found[name]}" for name in sorted(locked.keys() & found.keys())
             if locked[name] != found[name]]
    lines += [f"{name}: new, {found[name]}" for name in sorted(found.keys() - locked.keys())]
    lines += [f"{name}: gone (was {locked[name]})" for name in sorted(locked.keys() - found.keys())]
    return lines


def failed_tests(pytest_output: str) -> list[str]:
    return re.findall(r"^(?:FAILED|ERROR) (\S+)", pytest_output, re.M)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write-lock", action="store_true", help="write constraints.txt when the suite passes")
    parser.add_argument("--venv", type=Path, help="where to build the fresh venv (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line: changes, failures, status")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    args = parser.parse_args(argv)

    venv = args.venv or Path(tempfile.mkdtemp(prefix="lit-sftrl-drift-")) / "venv"
    python = venv / "bin" / "python"
    env = {**os.environ, "PIP_NO_CACHE_DIR": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", TORCH], check=True, env=env)
    subprocess.run([python, "-m", "pip", "install", "-q", "-e", f"{REPO}[{EXTRAS}]"], check=True, env=env)
    frozen = subprocess.run([python, "-m", "pip", "freeze", "--exclude-editable"], check=True, env=env,
                            capture_output=True, text=True).stdout
    found = {name: version for name, version in read_pins(frozen).items() if name != "torch"}
    locked = read_pins(LOCK.read_text()) if LOCK.exists() else {}
    drift = changes(locked, found)
    installed_s = time.monotonic() - started

    previous = LOCK.read_text() if LOCK.exists() else None
    if args.write_lock:  # the suite checks the lock it is about to keep (tests/test_install.py)
        LOCK.write_text(LOCK_HEADER + "".join(f"{name}=={version}\n" for name, version in sorted(found.items())))
    suite = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args.pytest_args], cwd=REPO,
                           env={**env, "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"},
                           capture_output=True, text=True)
    summary = (suite.stdout.strip().splitlines() or ["(no output)"])[-1]
    failures = failed_tests(suite.stdout)
    print(f"newest allowed versions installed in {installed_s:.0f} s ({venv})")
    print(f"packages that differ from {LOCK.name}: {len(drift)}" + "".join(f"\n  {line}" for line in drift))
    print(f"suite: {summary}" + "".join(f"\n  broke: {test}" for test in failures))
    passed = suite.returncode == 0
    if args.write_lock and passed:
        print(f"wrote {LOCK.relative_to(REPO)} ({len(found)} packages)")
    elif args.write_lock:
        if previous is None:
            LOCK.unlink()
        else:
            LOCK.write_text(previous)
        print(f"{LOCK.name} left as it was: the suite did not pass with the newest versions")
    if args.json:
        print(json.dumps({"changed": drift, "failed": failures, "suite": summary, "passed": passed}))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
