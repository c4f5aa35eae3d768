"""What every bench script shares: a row of the results table, and the table itself.

Each benchmark is a function returning rows; ``bench/all.py`` runs them all and prints one table.
"""

from __future__ import annotations

import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

LIT_SFTRL = str(Path(sys.executable).with_name("lit-sftrl"))


class Row(NamedTuple):
    name: str
    value: float
    unit: str
    target: float | None  # the value must be at least this; None: informational


def rate(work: Callable[[], object], seconds: float = 1.0) -> float:
    """Calls of ``work`` per second, best of three runs of about ``seconds`` each."""
    best = 0.0
    for _ in range(3):
        calls, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            for _ in range(100):
                work()
            calls += 100
        best = max(best, calls / elapsed)
    return best


def format_table(rows: list[Row]) -> str:
    width = max(len(row.name) for row in rows)
    lines = [f"{'benchmark':<{width}}  {'value':>12}  {'unit':<9} {'target':>10}  verdict"]
    for row in rows:
        target = "" if row.target is None else f">= {row.target:g}"
        verdict = "" if row.target is None else ("ok" if row.value >= row.target else "MISSED")
        lines.append(f"{row.name:<{width}}  {row.value:>12,.3f}  {row.unit:<9} {target:>10}  {verdict}")
    return "\n".join(lines)


def run_cli(*args: str) -> dict[str, object]:
    """Run ``lit-sftrl *args`` (printed first, so a README can quote it); return the command with its wall and
    CPU seconds (the CPU time of the command's own process tree, whatever else shares the machine)."""
    return run_command([LIT_SFTRL, *args], shown=["lit-sftrl", *args])


def run_command(argv: list[str], shown: list[str] | None = None) -> dict[str, object]:
    """Run ``argv`` as :func:`run_cli` does (``shown``: how to print it, e.g. without the interpreter's path)."""
    command = shlex.join(shown or argv)
    print("$ " + command, flush=True)
    start, cpu = time.perf_counter(), _children_cpu()
    subprocess.run(argv, check=True)
    wall, cpu = time.perf_counter() - start, _children_cpu() - cpu
    print(f"  ({wall:.0f} s, {cpu:.0f} s of CPU)", flush=True)
    return {"command": command, "wall_s": round(wall), "cpu_s": round(cpu)}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb() -> float:
    """This process's peak resident memory (``VmHWM``), in MiB. Not ``getrusage``'s ``ru_maxrss``: Linux carries
    the high-water mark of the process that forked this one across ``exec``, so a child started from a larger
    process would report that process's size as its own peak."""
    return _status_mb("VmHWM")


def rss_mb() -> float:
    """This process's resident memory now (``VmRSS``), in MiB."""
    return _status_mb("VmRSS")


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field} line (Linux only)")
