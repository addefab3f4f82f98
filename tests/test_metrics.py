"""Metrics against scikit-learn on random data, edge-case conventions, pooling."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as skm

from vesselseg import metrics as vm

SEEDS = (0, 1, 2, 3)


def _random_case(seed: int, shape: tuple[int, int] = (61, 47)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities loosely correlated with a sparse target, and a random FOV."""
    rng = np.random.default_rng(seed)
    target = rng.random(shape) < 0.15
    logits = rng.normal(0.0, 1.5, shape) + 2.0 * target - 1.0
    probs = (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    fov = rng.random(shape) < 0.8
    return probs, target, fov


@pytest.mark.parametrize("seed", SEEDS)
def test_threshold_metrics_match_sklearn(seed: int) -> None:
    probs, target, fov = _random_case(seed)
    pred = probs >= 0.5
    y, p = target[fov], pred[fov]
    tp, fp, fn, tn = vm.confusion(pred, target, fov)
    sk_tn, sk_fp, sk_fn, sk_tp = skm.confusion_matrix(y, p, labels=[False, True]).ravel()
    assert (tp, fp, fn, tn) == (sk_tp, sk_fp, sk_fn, sk_tn)
    assert all(isinstance(c, int) for c in (tp, fp, fn, tn))
    s = vm.scores_from_confusion(tp, fp, fn, tn)
    assert s["dice"] == pytest.approx(skm.f1_score(y, p), abs=1e-12)
    assert s["iou"] == pytest.approx(skm.jaccard_score(y, p), abs=1e-12)
    assert s["accuracy"] == pytest.approx(skm.accuracy_score(y, p), abs=1e-12)
    assert s["sensitivity"] == pytest.approx(skm.recall_score(y, p), abs=1e-12)
    assert s["specificity"] == pytest.approx(skm.recall_score(~y, ~p), abs=1e-12)
    assert s["precision"] == pytest.approx(skm.precision_score(y, p), abs=1e-12)
    assert s["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, p), abs=1e-12)


def test_threshold_tie_counts_as_vessel() -> None:
    probs = np.array([[0.5, 0.5, 0.2, 0.9]], np.float32)
    target = np.array([[True, False, False, True]])
    m = vm.image_metrics(probs, target, threshold=0.5)
    assert m["sensitivity"] == 1.0 and m["precision"] == pytest.approx(2 / 3)


def test_confusion_without_mask_counts_every_pixel() -> None:
    probs, target, _ = _random_case(5)
    pred = probs >= 0.5
    counts = vm.confusion(pred, target)
    assert sum(counts) == target.size
    assert counts[0] == int(np.sum(pred & target))


@pytest.mark.parametrize("seed", SEEDS)
def test_auc_and_log_loss_match_sklearn(seed: int) -> None:
    probs, target, fov = _random_case(seed, (120, 110))
    y, p = target[fov], probs[fov].astype(np.float64)
    assert vm.auc_roc(probs, target, fov) == pytest.approx(skm.roc_auc_score(y, p), abs=1e-4)
    # Our clip is eps=1e-7; clip before sklearn (which clips at float eps) to compare.
    ref = skm.log_loss(y, np.clip(p, 1e-7, 1 - 1e-7), labels=[False, True])
    assert vm.log_loss(probs, target, fov) == pytest.approx(ref, rel=1e-9)


def test_auc_uniform_random_probs_is_precise() -> None:
    rng = np.random.default_rng(11)
    target = rng.random(50_000) < 0.3
    probs = np.clip(rng.random(50_000) + 0.2 * target, 0, 1).astype(np.float32)
    assert vm.auc_roc(probs, target) == pytest.approx(skm.roc_auc_score(target, probs), abs=1e-6)


def test_auc_with_ties_is_exact() -> None:
    """Probabilities on a coarse grid: many ties, which count half as in sklearn."""
    rng = np.random.default_rng(7)
    target = rng.random((80, 80)) < 0.3
    probs = (np.round((rng.random((80, 80)) * 0.6 + 0.4 * target) * 10) / 10).astype(np.float32)
    fov = rng.random((80, 80)) < 0.9
    ref = skm.roc_auc_score(target[fov], probs[fov])
    assert vm.auc_roc(probs, target, fov) == pytest.approx(ref, abs=1e-12)
    # All probabilities equal: no ranking information at all.
    assert vm.auc_roc(np.full((10, 10), 0.3, np.float32), target[:10, :10]) == pytest.approx(0.5)


def test_auc_one_class_is_none() -> None:
    probs = np.random.default_rng(0).random((8, 8)).astype(np.float32)
    assert vm.auc_roc(probs, np.zeros((8, 8), bool)) is None
    assert vm.auc_roc(probs, np.ones((8, 8), bool)) is None


def test_edge_all_background_empty_prediction() -> None:
    target = np.zeros((6, 6), bool)
    s = vm.scores_from_confusion(*vm.confusion(np.zeros_like(target), target))
    assert s == {
        "dice": 1.0,
        "iou": 1.0,
        "accuracy": 1.0,
        "sensitivity": 1.0,
        "specificity": 1.0,
        "precision": 1.0,
        "balanced_accuracy": 1.0,
    }


def test_edge_all_background_with_false_positives() -> None:
    target = np.zeros((6, 6), bool)
    pred = np.zeros_like(target)
    pred[0, :3] = True
    s = vm.scores_from_confusion(*vm.confusion(pred, target))
    assert s["dice"] == 0.0 and s["iou"] == 0.0 and s["precision"] == 0.0
    assert s["sensitivity"] == 1.0  # nothing to miss
    assert s["specificity"] == pytest.approx(33 / 36)
    assert s["accuracy"] == pytest.approx(33 / 36)
    assert s["balanced_accuracy"] == pytest.approx((1 + 33 / 36) / 2)


def test_edge_all_foreground() -> None:
    target = np.ones((5, 5), bool)
    pred = target.copy()
    pred[0, 0] = False
    s = vm.scores_from_confusion(*vm.confusion(pred, target))
    assert s["specificity"] == 1.0  # no negatives to flag
    assert s["sensitivity"] == pytest.approx(24 / 25)
    assert s["precision"] == 1.0
    assert s["dice"] == pytest.approx(2 * 24 / (2 * 24 + 1))
    # Missing everything: precision with no positive predictions but real positives is 0.
    s0 = vm.scores_from_confusion(*vm.confusion(np.zeros_like(target), target))
    assert s0["precision"] == 0.0 and s0["dice"] == 0.0 and s0["sensitivity"] == 0.0


def test_edge_metrics_are_finite_and_json_safe() -> None:
    probs = np.full((4, 4), 0.0, np.float32)
    for target in (np.zeros((4, 4), bool), np.ones((4, 4), bool)):
        m = vm.image_metrics(probs, target, threshold=0.5)
        assert m["auc_roc"] is None
        finite = {k: v for k, v in m.items() if v is not None}
        assert all(math.isfinite(v) for v in finite.values())
        json.dumps(finite, allow_nan=False)
    # Empty FOV: counts are zero and every score stays defined.
    m = vm.image_metrics(probs, np.zeros((4, 4), bool), np.zeros((4, 4), bool))
    assert m["accuracy"] == 1.0 and m["log_loss"] == 0.0


def test_bad_inputs_raise_named_errors() -> None:
    t = np.zeros((4, 4), bool)
    with pytest.raises(ValueError, match="probs shape"):
        vm.auc_roc(np.zeros((4, 5), np.float32), t)
    with pytest.raises(ValueError, match=r"within \[0, 1\]"):
        vm.log_loss(np.full((4, 4), 1.5, np.float32), t)
    with pytest.raises(ValueError, match="bool"):
        vm.confusion(np.zeros((4, 4), np.uint8), t)
    with pytest.raises(ValueError, match="n_bins"):
        vm.MetricAccumulator(n_bins=1000)
    with pytest.raises(ValueError, match="threshold"):
        vm.MetricAccumulator(threshold=1.0)


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_accumulator_equals_concatenated_pixels(seed: int) -> None:
    rng = np.random.default_rng(seed)
    acc = vm.MetricAccumulator(threshold=0.5)
    all_p, all_t = [], []
    for k in range(4):
        shape = (int(rng.integers(20, 50)), int(rng.integers(20, 50)))
        probs, target, fov = _random_case(seed * 10 + k, shape)
        per_image = acc.update(probs, target, fov)
        direct = vm.image_metrics(probs, target, fov, threshold=0.5)
        assert per_image == direct
        all_p.append(probs[fov])
        all_t.append(target[fov])
    p, t = np.concatenate(all_p), np.concatenate(all_t)
    pooled = acc.result()
    direct = vm.image_metrics(p, t, threshold=0.5)
    assert acc.n_images == 4 and acc.n_pixels == p.size
    assert acc.confusion() == vm.confusion(p >= 0.5, t)
    for name in vm.SCORE_NAMES:
        assert pooled[name] == direct[name], name
    assert pooled["auc_roc"] == pytest.approx(direct["auc_roc"], abs=1e-15)
    assert pooled["auc_roc"] == pytest.approx(skm.roc_auc_score(t, p), abs=1e-4)
    assert pooled["log_loss"] == pytest.approx(direct["log_loss"], rel=1e-12)
    roc_a, roc_b = acc.roc_curve(51), vm.roc_curve(p, t, n_points=51)
    np.testing.assert_array_equal(roc_a.x, roc_b.x)
    np.testing.assert_array_equal(roc_a.threshold, roc_b.threshold)


def test_roc_curve_points_are_exact_and_downsampled() -> None:
    probs, target, fov = _random_case(3, (100, 100))
    curve = vm.roc_curve(probs, target, fov, n_points=41)
    assert 2 < curve.x.size <= 41
    assert (curve.x[0], curve.y[0]) == (0.0, 0.0) and (curve.x[-1], curve.y[-1]) == (1.0, 1.0)
    assert np.all(np.diff(curve.x) >= 0) and np.all(np.diff(curve.y) >= 0)
    assert np.all(np.diff(curve.threshold) < 0)
    y, p = target[fov], probs[fov]
    for fpr, tpr, thr in zip(curve.x, curve.y, curve.threshold, strict=True):
        pred = p >= thr
        assert tpr == np.count_nonzero(pred & y) / np.count_nonzero(y)
        assert fpr == np.count_nonzero(pred & ~y) / np.count_nonzero(~y)
    # Trapezoid area of the full (not downsampled) curve is the AUC.
    full = vm.roc_curve(probs, target, fov, n_points=10**7)
    assert np.trapezoid(full.y, full.x) == pytest.approx(vm.auc_roc(probs, target, fov), abs=1e-12)
    # On probabilities snapped to bin edges the histogram loses nothing: the full
    # curve must then be sklearn's, point for point, thresholds included.
    snapped = np.floor(probs.astype(np.float64) * 2**20) / 2**20
    full = vm.roc_curve(snapped, target, fov, n_points=10**7)
    sk_fpr, sk_tpr, sk_thr = skm.roc_curve(y, snapped[fov], drop_intermediate=False)
    np.testing.assert_array_equal(full.x, sk_fpr)
    np.testing.assert_array_equal(full.y, sk_tpr)
    np.testing.assert_array_equal(full.threshold[1:], sk_thr[1:])


def test_pr_curve_matches_sklearn_points() -> None:
    probs, target, fov = _random_case(4, (90, 90))
    y, p = target[fov], probs[fov]
    curve = vm.pr_curve(probs, target, fov, n_points=31)
    assert curve.x.size <= 31
    assert (curve.x[0], curve.y[0]) == (0.0, 1.0)
    assert curve.x[-1] == 1.0 and curve.y[-1] == pytest.approx(y.mean())
    for rec, prec, thr in zip(curve.x[1:], curve.y[1:], curve.threshold[1:], strict=True):
        pred = p >= thr
        assert rec == pytest.approx(skm.recall_score(y, pred), abs=1e-12)
        assert prec == pytest.approx(skm.precision_score(y, pred), abs=1e-12)


SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def test_real_drive_labels_against_sklearn() -> None:
    """Real vessel geometry and FOV (DRIVE), soft scores from a blurred label."""
    drive = SHARED / "DRIVE" / "test"
    if not drive.is_dir():
        pytest.skip(f"{drive} not found: real-data check needs ../shared/datasets/DRIVE")
    import cv2

    from vesselseg import imagefiles

    rng = np.random.default_rng(0)
    acc = vm.MetricAccumulator(threshold=0.5)
    ys, ps = [], []
    for n in ("01", "02"):
        label = imagefiles.read_mask(drive / "1st_manual" / f"{n}_manual1.gif")
        fov = imagefiles.read_mask(drive / "mask" / f"{n}_test_mask.gif", label.shape)
        soft = cv2.GaussianBlur(label.astype(np.float32), (0, 0), 1.5)
        probs = np.clip(soft + rng.normal(0, 0.1, label.shape), 0, 1).astype(np.float32)
        m = acc.update(probs, label, fov)
        y, p = label[fov], probs[fov]
        assert m["auc_roc"] == pytest.approx(skm.roc_auc_score(y, p), abs=1e-4)
        assert m["dice"] == pytest.approx(skm.f1_score(y, p >= 0.5), abs=1e-12)
        ys.append(y)
        ps.append(p)
    y, p = np.concatenate(ys), np.concatenate(ps)
    pooled = acc.result()
    assert pooled["auc_roc"] == pytest.approx(skm.roc_auc_score(y, p), abs=1e-4)
    assert pooled["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, p >= 0.5), abs=1e-12)
    ref = skm.log_loss(y, np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7), labels=[False, True])
    assert pooled["log_loss"] == pytest.approx(ref, rel=1e-9)
