"""run_evaluate end to end on a tiny prepared folder, plus the overlay figure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from skimage.morphology import skeletonize
from sklearn import metrics as skm

from vesselseg import imagefiles
from vesselseg.errors import DataError
from vesselseg.evaluate import PER_IMAGE_COLUMNS, run_evaluate
from vesselseg.figures import COLORS, overlay
from vesselseg.prepared import write_item
from vesselseg.topology import TOPOLOGY_NAMES, cal, image_topology

H, W = 30, 26
IDS = {"train": ["a0"], "val": ["v1", "v0"], "test": ["t2", "t0", "t1", "t3"]}
EMPTY_LABEL_ID = "t3"  # all-background label: its AUC does not exist


def _make_tree(root: Path, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Prepared items + probability maps; returns the arrays for direct computation."""
    rng = np.random.default_rng(seed)
    prepared, preds = root / "prepared", root / "predictions"
    yy, xx = np.mgrid[:H, :W]
    fov = (yy - H / 2) ** 2 + (xx - W / 2) ** 2 < (0.45 * min(H, W)) ** 2 * 1.3
    arrays: dict[str, dict[str, np.ndarray]] = {}
    for split, ids in IDS.items():
        for k, id_ in enumerate(ids):
            label = rng.random((H, W)) < 0.2
            if id_ == EMPTY_LABEL_ID:
                label[:] = False
            shape3 = (H, W, 3) if k % 2 else (H, W)
            image = rng.integers(0, 256, shape3, dtype=np.uint8)
            write_item(prepared, id_, image, label, fov)
            logits = rng.normal(0, 1.2, (H, W)) + 2.2 * label - 1.1
            probs = (1 / (1 + np.exp(-logits))).astype(np.float32)
            probs[H // 2, W // 2 - 3 : W // 2 + 3] = 0.5  # on the threshold: counts as vessel
            if split != "train":
                (preds / split / "probs").mkdir(parents=True, exist_ok=True)
                np.save(preds / split / "probs" / f"{id_}.npy", probs)
            arrays[id_] = {"probs": probs, "label": label, "fov": fov, "image": image}
    (prepared / "split.json").write_text(json.dumps({**IDS, "dataset": "tiny"}))
    return arrays


def _run(root: Path, out: str = "out", **kw: object) -> dict:
    o = root / out
    return run_evaluate(
        prepared_dir=root / "prepared",
        predictions_dir=root / "predictions",
        metrics_path=o / "metrics.json",
        per_image_path=o / "per_image.csv",
        plots_dir=o / "plots",
        overlays_dir=o / "overlays",
        threshold=0.5,
        **{"n_overlays": 2, "curve_points": 21, **kw},
    )


def _sk_scores(y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    pred = p >= threshold
    return {
        "dice": skm.f1_score(y, pred),
        "iou": skm.jaccard_score(y, pred),
        "accuracy": skm.accuracy_score(y, pred),
        "sensitivity": skm.recall_score(y, pred),
        "specificity": skm.recall_score(~y, ~pred),
        "precision": skm.precision_score(y, pred),
        "balanced_accuracy": skm.balanced_accuracy_score(y, pred),
        "auc_roc": skm.roc_auc_score(y, p),
        "log_loss": skm.log_loss(y, np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7), labels=[False, True]),
    }


def _topology_direct(ids: list[str], arrays: dict[str, dict[str, np.ndarray]]) -> dict[str, float]:
    """Pooled topology values computed here from scikit-image/scipy, not through vesselseg.topology
    (except CAL, whose hand-made cases live in test_topology.py)."""
    eight, four = ndimage.generate_binary_structure(2, 2), ndimage.generate_binary_structure(2, 1)

    def betti(m: np.ndarray) -> tuple[int, int]:
        b0 = ndimage.label(m, structure=eight)[1]
        b1 = ndimage.label(~np.pad(m, 1), structure=four)[1] - 1  # enclosed background
        return b0, b1

    sums = np.zeros(4)
    b0_err, b1_err, cals = [], [], []
    for i in ids:
        a = arrays[i]
        p, t = (a["probs"] >= 0.5) & a["fov"], a["label"] & a["fov"]
        sp, st = skeletonize(p), skeletonize(t)
        sums += [np.sum(sp & t), np.sum(sp), np.sum(st & p), np.sum(st)]
        (p0, p1), (t0, t1) = betti(p), betti(t)
        b0_err.append(abs(p0 - t0))
        b1_err.append(abs(p1 - t1))
        cals.append(cal(a["probs"] >= 0.5, a["label"], a["fov"]).cal)
    tprec, tsens = sums[0] / sums[1], sums[2] / sums[3]
    return {
        "cldice": 2 * tprec * tsens / (tprec + tsens),
        "betti0_error": float(np.mean(b0_err)),
        "betti1_error": float(np.mean(b1_err)),
        "cal": float(np.mean(cals)),
    }


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, dict[str, dict[str, np.ndarray]]]:
    return tmp_path, _make_tree(tmp_path)


def test_pooled_metrics_match_direct_computation(tree) -> None:
    root, arrays = tree
    result = _run(root)
    written = json.loads((root / "out" / "metrics.json").read_text())
    assert written == result
    assert set(written) == {"val", "test"}
    for split in ("val", "test"):
        ids = IDS[split]
        y = np.concatenate([arrays[i]["label"][arrays[i]["fov"]] for i in ids])
        p = np.concatenate([arrays[i]["probs"][arrays[i]["fov"]] for i in ids])
        ref = {**_sk_scores(y, p), **_topology_direct(ids, arrays)}
        assert written[split]["n_images"] == len(ids)
        assert set(written[split]) == set(ref) | {"n_images"}
        assert {"cldice", "betti0_error", "betti1_error", "cal"} <= set(written[split])
        assert 0.0 < written[split]["cldice"] < 1.0 and written[split]["betti0_error"] > 0
        for name, value in ref.items():
            assert written[split][name] == pytest.approx(value, abs=1.5e-6), (split, name)
            assert written[split][name] == round(written[split][name], 6)


def test_per_image_table(tree) -> None:
    root, arrays = tree
    _run(root)
    table = pd.read_csv(root / "out" / "per_image.csv", dtype={"id": str})
    assert tuple(table.columns) == PER_IMAGE_COLUMNS
    assert PER_IMAGE_COLUMNS[-len(TOPOLOGY_NAMES) :] == TOPOLOGY_NAMES
    assert table["betti0_error"].dtype == np.int64 and table["betti1_error"].dtype == np.int64
    expected_rows = [("test", i) for i in sorted(IDS["test"])] + [("val", i) for i in sorted(IDS["val"])]
    assert list(zip(table["split"], table["id"], strict=True)) == expected_rows
    for row in table.itertuples(index=False):
        a = arrays[row.id]
        y, p = a["label"][a["fov"]], a["probs"][a["fov"]]
        for name, value in image_topology(a["probs"] >= 0.5, a["label"], a["fov"]).items():
            assert getattr(row, name) == pytest.approx(value, abs=1e-6), (row.id, name)
        if row.id == EMPTY_LABEL_ID:
            assert np.isnan(row.auc_roc)  # empty cell, not a made-up number
            assert row.sensitivity == 1.0 and row.specificity == pytest.approx(np.mean(p < 0.5), abs=1e-6)
            continue
        for name, value in _sk_scores(y, p).items():
            assert getattr(row, name) == pytest.approx(value, abs=1.5e-6), (row.id, name)
    text = (root / "out" / "per_image.csv").read_text()
    assert "test,t3," in text and ",," in text.splitlines()[4]  # t3: the empty auc cell


def test_curve_files(tree) -> None:
    root, arrays = tree
    _run(root)
    roc = pd.read_csv(root / "out" / "plots" / "roc.csv")
    pr = pd.read_csv(root / "out" / "plots" / "pr.csv")
    assert list(roc.columns) == ["split", "fpr", "tpr", "threshold"]
    assert list(pr.columns) == ["split", "recall", "precision", "threshold"]
    assert set(roc["split"]) == {"test"}  # one split per file: DVC plots draw one line
    for split in ("test",):
        r = roc[roc["split"] == split]
        assert 3 <= len(r) <= 21
        assert (r["fpr"].iloc[0], r["tpr"].iloc[0]) == (0.0, 0.0)
        assert (r["fpr"].iloc[-1], r["tpr"].iloc[-1]) == (1.0, 1.0)
        assert r["fpr"].is_monotonic_increasing and r["tpr"].is_monotonic_increasing
        ids = IDS[split]
        y = np.concatenate([arrays[i]["label"][arrays[i]["fov"]] for i in ids])
        p = np.concatenate([arrays[i]["probs"][arrays[i]["fov"]] for i in ids])
        mid = r.iloc[len(r) // 2]
        pred = p >= mid["threshold"]  # thresholds are exact bin edges
        assert mid["tpr"] == pytest.approx(np.mean(pred[y]), abs=1e-6)
        q = pr[pr["split"] == split]
        assert 3 <= len(q) <= 21 and q["recall"].iloc[-1] == 1.0


def test_overlays_written_for_first_test_ids(tree) -> None:
    root, _ = tree
    (root / "out" / "overlays").mkdir(parents=True)
    (root / "out" / "overlays" / "stale.png").write_bytes(b"old run")
    _run(root)
    files = sorted(p.name for p in (root / "out" / "overlays").iterdir())
    assert files == ["t0.png", "t1.png"]  # first two test ids by name; stale file gone
    panel = imagefiles.read_image(root / "out" / "overlays" / "t0.png")
    assert panel.shape[0] > H and panel.shape[1] >= 4 * W and panel.shape[2] == 3


def test_outputs_are_byte_identical_across_runs(tree) -> None:
    root, _ = tree
    _run(root, "run1")
    _run(root, "run2")
    files1 = sorted(p.relative_to(root / "run1") for p in (root / "run1").rglob("*") if p.is_file())
    files2 = sorted(p.relative_to(root / "run2") for p in (root / "run2").rglob("*") if p.is_file())
    assert files1 == files2 and len(files1) == 6
    for rel in files1:
        assert (root / "run1" / rel).read_bytes() == (root / "run2" / rel).read_bytes(), rel


def test_missing_prediction_fails_before_writing(tree) -> None:
    root, _ = tree
    missing = root / "predictions" / "test" / "probs" / "t1.npy"
    missing.unlink()
    with pytest.raises(DataError, match="t1.npy"):
        _run(root)
    assert not (root / "out").exists()


def test_shape_mismatch_names_the_file(tree) -> None:
    root, _ = tree
    bad = root / "predictions" / "val" / "probs" / "v0.npy"
    np.save(bad, np.zeros((H, W + 1), np.float32))
    with pytest.raises(DataError, match=r"v0\.npy.*shape"):
        _run(root)
    assert not (root / "out").exists()


def test_probabilities_out_of_range_fail_without_outputs(tree) -> None:
    root, _ = tree
    bad = root / "predictions" / "test" / "probs" / "t2.npy"
    np.save(bad, np.full((H, W), 1.5, np.float32))
    with pytest.raises(DataError, match=r"t2\.npy.*\[0, 1\]"):
        _run(root)
    assert not (root / "out").exists()


def test_overlay_colours_and_fov_dimming() -> None:
    image = np.full((4, 5), 200, np.uint8)
    target = np.zeros((4, 5), bool)
    pred = np.zeros((4, 5), bool)
    target[0, 0] = pred[0, 0] = True  # TP
    pred[0, 1] = True  # FP
    target[0, 2] = True  # FN
    fov = np.ones((4, 5), bool)
    fov[3, :] = False
    out = overlay(image, pred, target, fov, captions=False)
    assert out.shape == (4, 4 * 5 + 3 * 4, 3) and out.dtype == np.uint8
    err = out[:, 3 * (5 + 4) :]
    assert tuple(err[0, 0]) == COLORS["TP"]
    assert tuple(err[0, 1]) == COLORS["FP"]
    assert tuple(err[0, 2]) == COLORS["FN"]
    assert tuple(err[0, 3]) == COLORS["TN"]
    assert tuple(out[0, 0]) == (200, 200, 200) and out[3, 0, 0] < 200  # dimmed outside FOV
    assert tuple(out[0, 5 + 4 + 1]) == (255, 255, 255)  # prediction panel shows the FP
    with_captions = overlay(image, pred, target, fov, probs=np.full((4, 5), 0.25, np.float32))
    assert with_captions.shape[0] > 4
    with pytest.raises(ValueError, match="pred shape"):
        overlay(image, pred[:3], target, fov)


def test_empty_fov_is_refused_by_name(tree) -> None:
    root, arrays = tree
    a = arrays["v1"]
    write_item(root / "prepared", "v1", a["image"], a["label"], np.zeros((H, W), bool))
    with pytest.raises(DataError, match=r"fov/v1\.png.*empty"):
        _run(root)
    assert not (root / "out").exists()
