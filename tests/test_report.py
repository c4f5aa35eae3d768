"""The report renders from small run directories: figures are non-empty PNGs of the documented size, the
markdown table holds the Init / SFT / RL values picked at matched compute, errors name the directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lit_sftrl.report import DPI, FIGSIZE, make_report, savgol

SIZE = (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))


def metrics(success: float, se: float, per_step: float = 0.5, recognition: float | None = None) -> dict:
    m = {"episodes": 234, "attempts": 2.0, "success": success, "success_stderr": se, "per_step_accuracy": per_step,
         "per_step_accuracy_stderr": 0.01, "well_formed": 0.9, "well_formed_stderr": 0.02}
    if recognition is not None:
        m.update(recognition=recognition, recognition_stderr=0.03)
    return m


def write_run(root: Path, name: str, module: str, records: list[tuple], init_from: str | None = "init.ckpt",
              task: str | None = None) -> Path:
    """records: (stage, step, flops, {variant: metrics})."""
    run = root / name
    (run / "eval").mkdir(parents=True)
    for stage, step, flops, values in records:
        record = {"stage": stage, "step": step, "epoch": 0, "flops": flops, "checkpoint": None, "module": module,
                  "init_from": init_from, "metrics": values}
        if task:
            record["task"] = task
        (run / "eval" / f"{stage}_{step:06d}.json").write_text(json.dumps(record))
    return run


def gp_runs(root: Path, recognition: bool = False) -> list[Path]:
    """An SFT and a PPO run, both from the same Init (sanity at 1000 GFLOPs). The budget is
    min(4000, 3400) = 3400 GFLOPs: SFT's test record (4000) is over it, so SFT = val step 20;
    RL = val step 6, exactly at the budget; Init = the SFT run's sanity record (first run with init_from)."""
    rec = (lambda r: r) if recognition else (lambda r: None)

    def both(ood: float, ood_se: float, r: float = 0.5) -> dict:
        return {"id": metrics(0.6, 0.03, recognition=rec(r)), "rule_ood": metrics(ood, ood_se, recognition=rec(r))}

    sft = write_run(root, "gp_sft", "SFTModule", [
        ("sanity", 0, 1e12, both(0.115, 0.021)), ("val", 10, 2e12, both(0.08, 0.018)),
        ("val", 20, 3e12, both(0.034, 0.012, 0.4)), ("val", 30, 4e12, both(0.02, 0.009)),
        ("test", 30, 4e12, both(0.01, 0.007))])
    ppo = write_run(root, "gp_ppo", "PPOModule", [
        ("sanity", 0, 1e12, both(0.116, 0.021)), ("val", 2, 1.8e12, both(0.12, 0.021)),
        ("val", 4, 2.6e12, both(0.13, 0.022)), ("val", 6, 3.4e12, both(0.15, 0.023, 0.7))])
    return [sft, ppo]


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == SIZE
        low, high = image.convert("L").getextrema()
        assert low < high  # something was drawn


def test_gp_report_matched_compute(tmp_path: Path) -> None:
    report = make_report(gp_runs(tmp_path), tmp_path / "out")
    assert report == tmp_path / "out" / "report.md"
    assert_png(tmp_path / "out" / "curves.png")
    assert_png(tmp_path / "out" / "bars.png")
    assert not (tmp_path / "out" / "recognition.png").exists()
    text = report.read_text()
    assert "| rule_ood | success | 11.5 ± 2.1 | 3.4 ± 1.2 | 15.0 ± 2.3 |" in text
    assert "| id | success | 60.0 ± 3.0 | 60.0 ± 3.0 | 60.0 ± 3.0 |" in text
    assert "Matched compute: 3400 GFLOPs" in text
    assert "FLOPs counted: tokens processed" in text  # records without compute_mode predate the paper mode
    assert "`gp_sft` (val, step 20, 3000 GFLOPs)" in text and "`gp_ppo` (val, step 6, 3400 GFLOPs)" in text
    assert "![curves.png](curves.png)" in text and "![bars.png](bars.png)" in text
    # Last record per run: the SFT test record (sorted after val at equal FLOPs), the RL val step 6.
    assert "| gp_sft | SFTModule | test | 30 | 4000 | 60.0 ± 3.0 | 1.0 ± 0.7 |" in text
    assert "| gp_ppo | PPOModule | val | 6 | 3400 | 60.0 ± 3.0 | 15.0 ± 2.3 |" in text


def test_gp_vl_recognition_figure_and_stale_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    make_report(gp_runs(tmp_path / "vl", recognition=True), out, smooth=5)
    assert_png(out / "recognition.png")
    assert "![recognition.png](recognition.png)" in (out / "report.md").read_text()
    make_report(gp_runs(tmp_path / "l"), out)  # a later report without recognition removes the stale figure
    assert not (out / "recognition.png").exists()


def test_virl_headline_metric(tmp_path: Path) -> None:
    def values(step_acc: float, success: float) -> dict:
        return {"rule_ood": metrics(0.0, 0.0, per_step=step_acc), "visual_ood": metrics(success, 0.05)}

    sft = write_run(tmp_path, "virl_sft", "SFTModule", [("sanity", 0, 1e9, values(0.8, 0.16)),
                                                         ("val", 5, 2e9, values(0.1, 0.11))], task="virl_vl")
    ppo = write_run(tmp_path, "virl_ppo", "PPOModule", [("sanity", 0, 1e9, values(0.8, 0.16)),
                                                         ("val", 5, 3e9, values(0.9, 0.78))], task="virl_vl")
    text = make_report([sft, ppo], tmp_path / "out").read_text()
    # Budget 2 GFLOPs: RL falls back to its sanity record (the only one within budget).
    assert "| rule_ood | per_step_accuracy | 80.0 ± 1.0 | 10.0 ± 1.0 | 80.0 ± 1.0 |" in text
    assert "| visual_ood | success | 16.0 ± 5.0 | 11.0 ± 5.0 | 16.0 ± 5.0 |" in text


def test_init_from_evaluation_only_run_and_missing_rl(tmp_path: Path) -> None:
    init = write_run(tmp_path, "init_eval", "SFTModule", [("test", 0, 0.0, {"id": metrics(0.2, 0.02)})], None)
    sft = write_run(tmp_path, "sft", "SFTModule", [("sanity", 0, 0.0, {"id": metrics(0.1, 0.01)}),
                                                    ("val", 3, 5e8, {"id": metrics(0.4, 0.03)})], None)
    out = tmp_path / "out"
    text = make_report([sft, init], out).read_text()
    assert "| id | success | 20.0 ± 2.0 | 40.0 ± 3.0 | — |" in text
    assert "Matched compute: 0.5 GFLOPs" in text
    assert_png(out / "bars.png")
    assert_png(out / "curves.png")


@pytest.mark.parametrize("smooth", [2, 3, 7, 50])
def test_smoothing_with_few_points(tmp_path: Path, smooth: int) -> None:
    runs = gp_runs(tmp_path)
    assert_png(Path(make_report(runs, tmp_path / "out", smooth=smooth)).parent / "curves.png")


def test_savgol() -> None:
    x = np.arange(9.0)
    cubic = 0.1 * x**3 - x**2 + 2 * x + 1
    np.testing.assert_allclose(savgol(cubic, 5), cubic, atol=1e-8)  # order-3 fits reproduce a cubic
    noisy = cubic + np.random.default_rng(0).normal(0, 1, x.size)
    assert np.abs(savgol(noisy, 7) - cubic).mean() < np.abs(noisy - cubic).mean()
    np.testing.assert_array_equal(savgol([0.1, 0.5, 0.2], 7), [0.1, 0.5, 0.2])  # too few points: unchanged


def test_errors_name_the_directory(tmp_path: Path) -> None:
    empty = tmp_path / "empty_run"
    (empty / "eval").mkdir(parents=True)
    with pytest.raises(ValueError, match="empty_run"):
        make_report([empty], tmp_path / "out")
    with pytest.raises(ValueError, match="no_such_run"):
        make_report([tmp_path / "no_such_run"], tmp_path / "out")
    with pytest.raises(ValueError):
        make_report([], tmp_path / "out")


def test_paper_sized_init_test_beats_sanity_and_near_budget_records_match(tmp_path: Path) -> None:
    """The study's layout: a test of the Init checkpoint (step 300, its own directory), then continued SFT and
    PPO runs from it, each ending in a test record; their FLOPs differ by 3 %, within MATCH_TOLERANCE."""
    init = write_run(tmp_path, "init_test", "SFTModule", [("test", 300, 1e12, {"rule_ood": metrics(0.2, 0.02)})],
                     init_from=None)
    sft = write_run(tmp_path, "sft", "SFTModule", [("sanity", 300, 1e12, {"rule_ood": metrics(0.9, 0.1)}),
                                                   ("test", 400, 2.00e12, {"rule_ood": metrics(0.1, 0.01)})])
    ppo = write_run(tmp_path, "rl", "PPOModule", [("sanity", 300, 1e12, {"rule_ood": metrics(0.9, 0.1)}),
                                                  ("test", 10, 2.06e12, {"rule_ood": metrics(0.3, 0.03)})])
    text = make_report([init, sft, ppo], tmp_path / "out").read_text()
    assert "| rule_ood | success | 20.0 ± 2.0 | 10.0 ± 1.0 | 30.0 ± 3.0 |" in text


def test_the_report_says_how_flops_were_counted_and_flags_a_mix(tmp_path: Path) -> None:
    runs = gp_runs(tmp_path)
    for record in (runs[1] / "eval").glob("*.json"):
        record.write_text(json.dumps({**json.loads(record.read_text()), "compute_mode": "paper"}))
    text = make_report(runs, tmp_path / "out").read_text()
    assert "FLOPs counted: the paper's approximation and tokens processed (mixed: not comparable)" in text


def seeded_runs(root: Path) -> list[Path]:
    """An Init test, two SFT and two RL seeds from it, each ending in a test record. rule_ood: Init 20 ± 2 %,
    SFT seeds 10 and 12 % (mean 11, standard error over seeds 1.0), RL seeds 30 and 34 % (mean 32, 2.0); RL's
    tests are 10 % past SFT's FLOPs, beyond MATCH_TOLERANCE."""
    def fit(flops: float, ood: float, ood_se: float) -> list[tuple]:  # a validation pass, then the test
        return [(stage, 1, flops, {"id": metrics(0.5, 0.05), "rule_ood": metrics(ood, ood_se)})
                for stage in ("val", "test")]

    init = write_run(root, "init_test", "SFTModule", fit(1e12, 0.20, 0.02)[1:], init_from=None)
    sft = [write_run(root, f"sft_seed{s}", "SFTModule", fit(2.0e12, ood, 0.01)) for s, ood in enumerate((0.10, 0.12))]
    rl = [write_run(root, f"rl_seed{s}", "PPOModule", fit(2.2e12, ood, 0.03)) for s, ood in enumerate((0.30, 0.34))]
    return [init, *sft, *rl]


def test_seeds_of_an_arm_give_its_mean_and_standard_error_over_seeds_and_the_sign_patterns_verdict(tmp_path):
    from lit_sftrl.report import comparison, load_run

    runs = seeded_runs(tmp_path)
    text = make_report(runs, tmp_path / "out", seeds=2, tests=True).read_text()
    assert_png(tmp_path / "out" / "bars.png")
    assert "| rule_ood | success | 20.0 ± 2.0 | 11.0 ± 1.0 | 32.0 ± 2.0 |" in text
    assert "| rule_ood | RL | 30.0 ± 3.0 | 34.0 ± 3.0 | 32.0 ± 2.0 |" in text  # each seed ± its binomial stderr
    # RL - Init 12 ± sqrt(2² + 2²) = 2.8: beyond; Init - SFT 9 ± sqrt(2² + 1²) = 2.2: beyond. id: every seed
    # scores Init's 50 %, so the seeds spread by 0 and each gap's standard error is Init's binomial 5.0.
    assert "| rule_ood | +12.0 ± 2.8 (beyond) | +9.0 ± 2.2 (beyond) | yes |" in text
    assert "| id | +0.0 ± 5.0 (within) | +0.0 ± 5.0 (within) | no |" in text
    result = comparison([load_run(run) for run in runs], seeds=2, tests=True)
    assert result["arms"]["SFT"]["scores"]["rule_ood"]["mean"] == pytest.approx(0.11)
    assert result["arms"]["Init"]["scores"]["rule_ood"]["stderr_kind"] == "binomial"
    assert result["verdict"]["rule_ood"]["sign_pattern"] and not result["verdict"]["id"]["sign_pattern"]
    # Without tests the compute is matched by the records' FLOPs: RL's tests lie 10 % past SFT's, so no RL bar.
    matched = make_report(runs, tmp_path / "matched", seeds=2).read_text()
    assert "| rule_ood | success | 20.0 ± 2.0 | 11.0 ± 1.0 | — |" in matched and "- RL:" not in matched


def test_seeds_need_a_run_per_seed_of_each_arm(tmp_path):
    runs = seeded_runs(tmp_path)
    with pytest.raises(ValueError, match="--seeds 3: 2 SFT run"):
        make_report(runs, tmp_path / "out", seeds=3)
