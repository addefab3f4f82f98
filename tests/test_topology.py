"""Topology metrics on hand-made masks whose values are known by counting pixels."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.measure import euler_number
from skimage.morphology import skeletonize

from vesselseg.topology import (
    TOPOLOGY_NAMES,
    TopologyAccumulator,
    betti_numbers,
    cal,
    cldice,
    image_topology,
    skeleton,
)


def line(shape: tuple[int, int] = (11, 30), row: int = 5, cols: tuple[int, int] = (2, 28)) -> np.ndarray:
    """A 1-px horizontal line: its own skeleton, so every count is known exactly."""
    m = np.zeros(shape, bool)
    m[row, cols[0] : cols[1]] = True
    return m


def ring(size: int = 21, inner: float = 5, outer: float = 7) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size // 2, xx - size // 2)
    return (r >= inner) & (r <= outer)


def holes_by_euler(mask: np.ndarray) -> int:
    """b1 counted independently of the labelling: b0 - Euler number (8-connected foreground)."""
    b0 = ndimage.label(mask, structure=np.ones((3, 3)))[1]
    return int(b0 - euler_number(mask, connectivity=2))


def reference_cldice(p: np.ndarray, t: np.ndarray) -> float:
    """The formula of github.com/jocpae/clDice, cldice_metric/cldice.py (non-empty masks)."""
    a = np.sum(p * skeletonize(t)) / np.sum(skeletonize(t))
    b = np.sum(t * skeletonize(p)) / np.sum(skeletonize(p))
    return 2 * a * b / (a + b)


def test_a_1px_line_is_its_own_skeleton() -> None:
    lab = line()
    assert (skeleton(lab) == lab).all()
    assert not skeleton(np.zeros((5, 5), bool)).any()


def test_broken_line() -> None:
    lab = line()  # 26 px
    pred = lab.copy()
    pred[5, 14:17] = False  # a 3-px gap: 23 px in two pieces
    cl, tprec, tsens = cldice(pred, lab)
    assert tprec == 1.0  # every predicted centreline pixel lies on the label
    assert tsens == pytest.approx(23 / 26)
    assert cl == pytest.approx(2 * (23 / 26) / (1 + 23 / 26)) and cl < 1.0
    assert betti_numbers(pred) == (2, 0) and betti_numbers(lab) == (1, 0)
    values = image_topology(pred, lab)
    assert values["betti0_error"] == 1 and values["betti1_error"] == 0
    score = cal(pred, lab)
    # C: one extra component over 26 label pixels; the 3-px gap lies within the 2-px tolerance of A and L
    assert (score.connectivity, score.area, score.length) == (pytest.approx(1 - 1 / 26), 1.0, 1.0)
    assert values["cal"] == pytest.approx(score.cal)


def test_ring_and_ring_broken_once() -> None:
    lab = ring()
    assert betti_numbers(lab) == (1, 1)
    pred = lab.copy()
    pred[9:12, 14:19] = False  # cut through the ring once: still one piece, no hole
    assert betti_numbers(pred) == (1, 0)
    values = image_topology(pred, lab)
    assert values["betti1_error"] == 1 and values["betti0_error"] == 0
    assert values["cl_precision"] == 1.0 and values["cl_sensitivity"] < 1.0
    for m in (lab, pred):
        assert betti_numbers(m)[1] == holes_by_euler(m)


def test_connectivity_is_8_for_vessels_and_4_for_holes() -> None:
    # a diamond of 8 pixels touching only at corners: one component enclosing one hole
    diamond = np.zeros((7, 7), bool)
    for y, x in [(1, 3), (2, 2), (3, 1), (4, 2), (5, 3), (4, 4), (3, 5), (2, 4)]:
        diamond[y, x] = True
    assert betti_numbers(diamond) == (1, 1)
    # a diagonal 1-px vessel is one component, not one per pixel
    assert betti_numbers(np.eye(9, dtype=bool)) == (1, 0)


def test_spur_lowers_precision_only() -> None:
    lab = line()  # 26 px
    pred = lab.copy()
    pred[0:5, 10] = True  # a 5-px branch sticking out of the vessel
    cl, tprec, tsens = cldice(pred, lab)
    assert tsens == 1.0
    assert tprec == pytest.approx(26 / 31)  # the branch's 5 skeleton pixels lie outside the label
    assert cl < 1.0
    values = image_topology(pred, lab)
    assert values["betti0_error"] == 0 and values["betti1_error"] == 0
    score = cal(pred, lab)
    # the two branch pixels nearest the vessel are within the 2-px tolerance, the other three not
    assert (score.connectivity, score.area, score.length) == (1.0, pytest.approx(28 / 31), pytest.approx(28 / 31))


def test_identical_masks() -> None:
    rng = np.random.default_rng(0)
    m = ndimage.binary_dilation(rng.random((40, 50)) < 0.02, iterations=2)
    values = image_topology(m, m)
    assert values == {
        "cldice": 1.0,
        "cl_precision": 1.0,
        "cl_sensitivity": 1.0,
        "betti0_error": 0,
        "betti1_error": 0,
        "cal": 1.0,
    }
    assert tuple(values) == TOPOLOGY_NAMES


def test_empty_prediction_and_empty_label() -> None:
    lab = ring()
    empty = np.zeros_like(lab)
    values = image_topology(empty, lab)
    assert values["cldice"] == 0.0 and values["cl_precision"] == 0.0 and values["cl_sensitivity"] == 0.0
    assert values["betti0_error"] == 1 and values["betti1_error"] == 1
    assert values["cal"] == 0.0  # A = 0: nothing of the label is found
    both = image_topology(empty, empty)
    assert both == {
        "cldice": 1.0,
        "cl_precision": 1.0,
        "cl_sensitivity": 1.0,
        "betti0_error": 0,
        "betti1_error": 0,
        "cal": 1.0,
    }
    spurious = image_topology(lab, empty)  # vessels predicted where the label has none
    assert spurious["cldice"] == 0.0 and spurious["cl_sensitivity"] == 1.0 and spurious["cal"] == 0.0


def test_shifted_line_scores_zero_dice_but_full_cal() -> None:
    lab = line()
    pred = line(row=6)  # the same vessel one pixel lower: no pixel overlaps
    assert not (pred & lab).any()
    score = cal(pred, lab)
    assert (score.connectivity, score.area, score.length) == (1.0, 1.0, 1.0)  # CAL tolerates a 2-px offset
    assert cldice(pred, lab)[0] == 0.0


def test_only_the_fov_counts() -> None:
    lab = line(shape=(20, 30))
    pred = lab.copy()
    pred[15:18, 3:6] = True  # a spurious blob ...
    fov = np.ones_like(lab)
    fov[12:, :] = False  # ... outside the field of view
    assert image_topology(pred, lab, fov) == image_topology(lab, lab)
    assert image_topology(pred, lab)["betti0_error"] == 1
    assert betti_numbers(pred, fov) == (1, 0)
    # a vessel cut by the FOV border ends there: two pieces inside the FOV
    fov2 = np.ones_like(lab)
    fov2[:, 14:16] = False
    assert betti_numbers(lab, fov2) == (2, 0)


def test_cldice_matches_the_reference_formula_on_blobs() -> None:
    rng = np.random.default_rng(3)
    for _ in range(3):
        t = ndimage.binary_dilation(rng.random((60, 70)) < 0.01, iterations=3)
        p = ndimage.binary_dilation(t ^ (rng.random(t.shape) < 0.05), iterations=1)
        assert cldice(p, t)[0] == pytest.approx(reference_cldice(p, t), abs=1e-12)
        assert betti_numbers(p)[1] == holes_by_euler(p)


def test_cal_matches_its_formula_on_blobs() -> None:
    rng = np.random.default_rng(5)
    disc = np.hypot(*np.mgrid[-2:3, -2:3]) <= 2  # radius alpha = beta = 2

    def dil(m: np.ndarray) -> np.ndarray:
        return ndimage.binary_dilation(m, structure=disc)

    for _ in range(3):
        t = ndimage.binary_dilation(rng.random((60, 70)) < 0.01, iterations=2)
        p = np.pad(ndimage.binary_dilation(t ^ (rng.random(t.shape) < 0.03), iterations=1), 1)[1:-1, 1:-1]
        assert not p.flags["C_CONTIGUOUS"]  # a view, as a caller may pass
        sp, st = skeletonize(p), skeletonize(t)
        n_p, n_t = (ndimage.label(m, structure=np.ones((3, 3)))[1] for m in (p, t))
        c = 1 - min(1, abs(n_t - n_p) / t.sum())
        a = ((dil(p) & t) | (p & dil(t))).sum() / (p | t).sum()
        length = ((sp & dil(t)) | (dil(p) & st)).sum() / (sp | st).sum()
        score = cal(p, t)
        assert (score.connectivity, score.area, score.length) == (
            pytest.approx(c),
            pytest.approx(a),
            pytest.approx(length),
        )
        assert 0 < score.cal < 1


def test_accumulator_pools_skeleton_counts_and_averages_errors() -> None:
    lab = line()
    broken = lab.copy()
    broken[5, 14:17] = False  # |S(P) ∩ L| = 23, |S(P)| = 23, |S(L) ∩ P| = 23, |S(L)| = 26
    spur = lab.copy()
    spur[0:5, 10] = True  # 26, 31, 26, 26
    acc = TopologyAccumulator()
    assert acc.result() == {}
    first = acc.update(broken, lab)
    acc.update(spur, lab)
    assert first == image_topology(broken, lab)
    assert acc.n_images == 2
    tprec, tsens = (23 + 26) / (23 + 31), (23 + 26) / (26 + 26)
    res = acc.result()
    assert res["cldice"] == pytest.approx(2 * tprec * tsens / (tprec + tsens))
    assert res["betti0_error"] == 0.5 and res["betti1_error"] == 0.0
    assert res["cal"] == pytest.approx((cal(broken, lab).cal + cal(spur, lab).cal) / 2)


@pytest.mark.parametrize(
    ("pred", "target", "fov", "match"),
    [
        (np.zeros((4, 4)), np.zeros((4, 4), bool), None, "pred must be a bool"),
        (np.zeros((4, 5), bool), np.zeros((4, 4), bool), None, "pred shape"),
        (np.zeros((4, 4), bool), np.zeros((4, 4), bool), np.ones((3, 4), bool), "mask shape"),
        (np.zeros((2, 4, 4), bool), np.zeros((2, 4, 4), bool), None, "2D"),
    ],
)
def test_bad_inputs_are_refused(pred, target, fov, match) -> None:
    with pytest.raises(ValueError, match=match):
        image_topology(pred, target, fov)
