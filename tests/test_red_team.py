"""bench/red_team.py runs each case in its own process and classifies what happened (two quick cases here; the
whole table is in docs/reliability.md)."""

from __future__ import annotations

import json

import pytest

from bench import red_team


@pytest.mark.slow
def test_red_team_cases_are_refused_in_one_line_and_hold(capsys):
    results = red_team.main(["--only", "make-tiny-full", "lr-nan", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in printed] == ["lr-nan", "make-tiny-full"]
    by_name = {r.name: r for r in results}
    assert all(r.outcome == "refused in one line" for r in results), results
    assert by_name["make-tiny-full"].holds is True and "already exists" in by_name["make-tiny-full"].message
    assert "a finite number is needed" in by_name["lr-nan"].message
    assert all(r.seconds > 0 and r.peak_mb > 10 for r in results)  # measured for the child, not this process


def test_every_case_has_a_unique_name():
    names = [case.name for case in red_team.CASES]
    assert len(names) == len(set(names)) >= 15
