"""Resized datasets are scored at their native resolution (the published cross-dataset protocol)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.helpers import make_prepared
from vesselseg.imagefiles import write_png
from vesselseg.prepared import PreparedDataset


def _halved_with_native(root: Path) -> Path:
    full = make_prepared(root / "full", n_train=1, n_val=1, n_test=2, size=48)
    half = make_prepared(root / "half", n_train=1, n_val=1, n_test=2, size=24)
    ds = PreparedDataset(full)
    sizes = {}
    for id_ in ds.ids("test"):
        it = ds.load(id_)
        write_png(half / "native" / "labels" / f"{id_}.png", it.label)
        write_png(half / "native" / "fov" / f"{id_}.png", it.fov)
        sizes[id_] = [48, 48]
    (half / "native_sizes.json").write_text(json.dumps(sizes))
    return half


def test_evaluate_maps_predictions_back_and_scores_native_pixels(tmp_path: Path) -> None:
    from vesselseg.evaluate import run_evaluate
    from vesselseg.preprocess.spec import to_native

    half = _halved_with_native(tmp_path)
    ds = PreparedDataset(half)
    preds = tmp_path / "pred"
    rng = np.random.default_rng(0)
    expect_tp = expect_n = 0
    for split in ("val", "test"):
        (preds / split / "probs").mkdir(parents=True)
        for id_ in ds.ids(split):
            probs = rng.random((24, 24)).astype(np.float32)
            np.save(preds / split / "probs" / f"{id_}.npy", probs)
            if split == "test":
                label, fov = ds.native(id_)
                p = to_native(probs, (48, 48)) >= 0.5
                expect_tp += int((p & label & fov).sum())
                expect_n += int(((p | label) & fov).sum()) + int((p & label & fov).sum())
    out = tmp_path / "reports"
    metrics = run_evaluate(
        prepared_dir=half,
        predictions_dir=preds,
        metrics_path=out / "metrics.json",
        per_image_path=out / "per_image.csv",
        plots_dir=out / "plots",
        overlays_dir=out / "ov",
        threshold=0.5,
        n_overlays=0,
        curve_points=11,
    )
    assert metrics["test"]["dice"] == pytest.approx(2 * expect_tp / expect_n, abs=1e-6)


def test_prepare_keeps_native_labels_of_resized_images(tmp_path: Path) -> None:
    from vesselseg.data.adapters import mark_raw
    from vesselseg.data.synthetic_fundus import generate_fundus_dataset
    from vesselseg.params import DataParams, PrepareParams
    from vesselseg.prepare import NATIVE_SIZES, run_prepare

    generate_fundus_dataset(tmp_path / "raw", n_images=4, size=64, seed=0)
    mark_raw(tmp_path / "raw", "synthetic-fundus")
    data = DataParams(dataset="synthetic-fundus", val_fraction=0.25, test_fraction=0.25)
    run_prepare(raw_dir=tmp_path / "raw", out_dir=tmp_path / "prep", data=data, prepare=PrepareParams(scale=0.5))
    ds = PreparedDataset(tmp_path / "prep")
    sizes = json.loads((tmp_path / "prep" / NATIVE_SIZES).read_text())
    for id_ in ds.ids("test"):
        item = ds.load(id_)
        label, _ = ds.native(id_)
        assert item.label.shape == (32, 32) and label.shape == (64, 64) == tuple(sizes[id_])
        small = cv2.resize(label.astype(np.uint8), (32, 32), interpolation=cv2.INTER_AREA) > 0
        assert (small == item.label).mean() > 0.8
    run_prepare(raw_dir=tmp_path / "raw", out_dir=tmp_path / "same", data=data, prepare=PrepareParams())
    assert not (tmp_path / "same" / "native").exists() and not (tmp_path / "same" / NATIVE_SIZES).exists()
