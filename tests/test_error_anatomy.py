"""benchmarks/error_anatomy.py: its counts on a hand-made bar with known errors, and a
run on a tiny trained model (one model and an ensemble of two)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import load_benchmark, make_prepared

ea = load_benchmark("error_anatomy.py", "error_anatomy")


def bar_case():
    """A 5-px-tall vessel (rows 10-14, columns 5-44) predicted one row too wide (row 15,
    p = 0.55), with a 3-column gap (columns 20-22, p = 0) and a 2x2 stray blob (p = 0.7)."""
    label = np.zeros((30, 50), bool)
    label[10:15, 5:45] = True
    probs = np.zeros((30, 50), np.float32)
    probs[10:15, 5:45] = 0.9
    probs[15, 5:45] = 0.55
    probs[:, 20:23] = 0.0
    probs[25:27, 25:27] = 0.7
    return ea.Case("bar", probs, label, np.ones_like(label))


def test_error_anatomy_counts_band_and_away_errors_of_a_hand_made_bar() -> None:
    a = ea.anatomy([bar_case()])
    # gap: 15 label pixels missed; rows 10 and 14 lie in the band (6), rows 11-13 not (9)
    # extra row 15 minus the gap: 37 band false positives; the blob: 4 away
    assert {k: a[k] for k in ("tp", "fp_band", "fp_away", "fn_band", "fn_away")} == {
        "tp": 185.0,
        "fp_band": 37.0,
        "fp_away": 4.0,
        "fn_band": 6.0,
        "fn_away": 9.0,
    }
    assert a["dice"] == pytest.approx(370 / 426)
    assert a["dice_without_band_errors"] == pytest.approx(370 / 383)
    assert a["dice_without_away_errors"] == pytest.approx(370 / 413)


def test_threshold_and_small_component_rows_of_the_bar() -> None:
    cases = [bar_case()]
    assert ea.pooled(cases, lambda p: p >= 0.5) == pytest.approx(370 / 426)
    assert ea.pooled(cases, lambda p: p >= 0.6) == pytest.approx(370 / 389)  # the wide row is gone
    # components of 5+ px kept: the blob (4 px) goes, the two bar pieces (90 and 132 px) stay
    assert ea.pooled(cases, lambda p: ea.remove_small(p >= 0.5, 5)) == pytest.approx(370 / 422)
    assert ea.pooled(cases, lambda p: ea.remove_small(p >= 0.5, 100)) < 370 / 426  # a bar piece goes too


def test_boundary_band_ignores_the_image_edge() -> None:
    label = np.zeros((8, 8), bool)
    label[:, :3] = True  # touches the top, bottom and left edges
    band = ea.boundary_band(label)
    assert band[:, 2].all() and band[:, 3].all()  # both sides of the one real boundary
    assert not band[:, :2].any() and not band[:, 4:].any()


def test_ensemble_is_the_mean_of_the_members() -> None:
    a = bar_case()
    b = ea.Case("bar", np.zeros_like(a.probs), a.label, a.fov)
    (mean,) = ea.mean_cases([[a], [b]])
    assert np.allclose(mean.probs, a.probs / 2) and mean.id == "bar"
    assert ea.pooled([mean], lambda p: p >= 0.5) == 0.0  # 0.9 / 2 < 0.5 everywhere


def test_main_scores_a_trained_model_and_an_ensemble(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.test_segment import tiny_model_file

    prepared = make_prepared(tmp_path / "prepared")
    m1 = tiny_model_file(tmp_path / "a.pt", steps=40)
    m2 = tiny_model_file(tmp_path / "b.pt", steps=20)
    for models in ([m1], [m1, m2]):
        argv = ["error_anatomy.py", "--prepared", str(prepared), "--split", "val", "--tta", "flips"]
        for m in models:
            argv += ["--model", str(m)]
        monkeypatch.setattr(sys, "argv", argv)
        assert ea.main() == 0
        out = capsys.readouterr().out
        assert "1. pooled Dice by threshold" in out and "3. error pixels" in out
        assert ("4. ensemble" in out) == (len(models) == 2)
    # the ensemble table's rows are the members' own scores, recomputed here
    cases = ea.predict_cases(m1, prepared, "val", "flips")
    assert f"{ea.pooled(cases, lambda p: p >= 0.5):.4f}" in out
