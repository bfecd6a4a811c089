"""The report's roofline-vs-measured section, on a real Optuna study with measured-latency attrs."""

from __future__ import annotations

import optuna
import pytest

from hpsearch.report import roofline_agreement, write_report


def _study(measured: list[float], roofline: list[float]) -> optuna.Study:
    study = optuna.create_study(directions=["minimize", "minimize", "minimize"])
    for i, (m, r) in enumerate(zip(measured, roofline)):
        trial = study.ask()
        trial.set_user_attr("latency_roofline_ms", r)
        trial.set_user_attr("roofline_error", (r - m) / m)
        trial.set_user_attr("latency_source", "measured:test-gpu (per-layer CUDA graphs; rest: cuda graph)")
        study.tell(trial, [10.0 - i, 1.0 + i, m])
    return study


def test_roofline_agreement_reports_error_and_rank_order(tmp_path):
    measured = [1.0, 2.0, 3.0, 4.0]
    roofline = [0.5, 1.0, 3.3, 2.0]  # errors -50%, -50%, +10%, -50%; ranks differ for the last two
    result = roofline_agreement(_study(measured, roofline).trials)
    assert result["trials"] == 4
    assert result["median_abs_error"] == pytest.approx(0.5)
    assert result["min_error"] == pytest.approx(-0.5) and result["max_error"] == pytest.approx(0.1)
    assert result["spearman"] == pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)
    write_report(_study(measured, roofline), tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "## Roofline against measured latency" in text and "median of 50.0%" in text


def test_no_section_without_measurements(tmp_path):
    study = optuna.create_study(directions=["minimize", "minimize"])
    study.tell(study.ask(), [1.0, 2.0])
    assert roofline_agreement(study.trials) is None
    write_report(study, tmp_path)
    assert "Roofline against measured" not in (tmp_path / "report.md").read_text()


def test_affine_calibration_recovers_an_offset_and_slope():
    roofline = [1.0, 2.0, 3.0, 4.0, 5.0]
    measured = [0.5 + 2.0 * r for r in roofline]  # e.g. a fixed launch cost plus a bandwidth shortfall
    result = roofline_agreement(_study(measured, roofline).trials)
    assert result["calibrated_offset_ms"] == pytest.approx(0.5)
    assert result["calibrated_slope"] == pytest.approx(2.0)
    assert result["calibrated_r2"] == pytest.approx(1.0)
    assert result["calibrated_median_abs_error"] == pytest.approx(0.0, abs=1e-12)
    assert result["median_abs_error"] > 0.5  # the uncalibrated roofline is far off
