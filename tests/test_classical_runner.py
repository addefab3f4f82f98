"""The classical baselines as train/predict stages: files, layout, and where thresholds come from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import f1_score
from sklearn.neighbors import KNeighborsClassifier

from tests.helpers import line_scene, make_prepared
from vesselseg import imagefiles
from vesselseg.errors import DataError
from vesselseg.families import get_family
from vesselseg.families.base import TrainJob
from vesselseg.families.knn import neighbourhood_features
from vesselseg.families.vesselness import choose_threshold, frangi_vesselness, vesselness_to_probability
from vesselseg.inference.predict import run_predict
from vesselseg.params import ModelParams, PredictParams, parse_params
from vesselseg.prepared import PreparedDataset, write_item
from vesselseg.training.loop import HISTORY_COLUMNS


def fit_classical(*, model: ModelParams, seed: int, prepared_dir: Path, **paths: Path) -> dict:
    """The train stage's call for a classical family (through the registry)."""
    job = TrainJob(params=parse_params({"seed": seed, "model": model}), prepared_dir=prepared_dir, **paths)
    return get_family(model.name).fit(job)


def predict_classical(*, model_path: Path, prepared_dir: Path, out_dir: Path, threshold: float) -> dict:
    """The predict stage's call: the one prediction writer, family read from the model file."""
    return run_predict(
        model_path=model_path, prepared_dir=prepared_dir, out_dir=out_dir, predict=PredictParams(threshold=threshold)
    )


def _paths(tmp: Path) -> dict[str, Path]:
    return {
        "model_path": tmp / "models" / "model.pt",
        "history_path": tmp / "reports" / "history.csv",
        "metrics_path": tmp / "reports" / "metrics.json",
    }


def _check_predictions(out: Path, prepared: Path, threshold: float) -> dict[str, np.ndarray]:
    ds = PreparedDataset(prepared)
    probs = {}
    for split in ("val", "test"):
        ids = ds.ids(split)
        assert sorted(p.stem for p in (out / split / "probs").glob("*.npy")) == sorted(ids)
        assert sorted(p.stem for p in (out / split / "masks").glob("*.png")) == sorted(ids)
        for id_ in ids:
            p = np.load(out / split / "probs" / f"{id_}.npy")
            assert p.dtype == np.float32 and p.shape == ds.load(id_).label.shape
            assert np.isfinite(p).all() and p.min() >= 0.0 and p.max() <= 1.0
            mask = imagefiles.read_image(out / split / "masks" / f"{id_}.png")
            assert set(np.unique(mask)) <= {0, 255}
            np.testing.assert_array_equal(mask == 255, p >= threshold)
            probs[id_] = p
    assert not list(out.parent.glob(".tmp-*")), "temporary folders left behind"
    return probs


def _check_history(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path)
    assert list(df.columns) == HISTORY_COLUMNS
    assert len(df) == 1 and df["epoch"].tolist() == [1]
    assert df.notna().all().all(), "NaN or empty cells break DVC plots"
    return df


def test_knn_fit_and_predict(tmp_path: Path) -> None:
    prepared = make_prepared(tmp_path / "prepared", n_train=3, n_val=2, n_test=2, size=40)
    model = ModelParams(name="knn", knn={"k_grid": (1, 3, 5), "cv": 2, "max_pixels": 1500})
    paths = _paths(tmp_path)
    metrics = fit_classical(model=model, seed=3, prepared_dir=prepared, **paths)
    assert metrics["best_k"] in (1, 3, 5) and 0 < metrics["n_train_pixels"] <= 1500
    assert json.loads(paths["metrics_path"].read_text()) == metrics

    obj = torch.load(paths["model_path"], weights_only=True)  # tensors only: no pickled estimator
    assert obj["format"] == "vesselseg-model/1" and obj["config"] == {"name": "knn", "k": metrics["best_k"]}
    X, y = obj["state_dict"]["X"].numpy(), obj["state_dict"]["y"].numpy()
    assert X.shape == (metrics["n_train_pixels"], 9) and set(np.unique(y)) == {0, 1}

    out = tmp_path / "predictions"
    probs = predict_classical(model_path=paths["model_path"], prepared_dir=prepared, out_dir=out, threshold=0.5)
    assert probs["n_images"] == 4
    maps = _check_predictions(out, prepared, 0.5)

    # independent reference: a classifier fitted on the stored pixels, queried inside the FOV
    ref = KNeighborsClassifier(n_neighbors=metrics["best_k"]).fit(X, y)
    item = PreparedDataset(prepared).load("te1")
    expect = np.zeros(item.label.size, np.float32)
    inside = item.fov.ravel()
    expect[inside] = ref.predict_proba(neighbourhood_features(item.image)[inside])[:, 1]
    np.testing.assert_allclose(maps["te1"], expect.reshape(item.label.shape), atol=1e-6)
    assert maps["te1"][~item.fov].max() == 0.0

    # history/metrics validation Dice = F1 of the saved val maps at 0.5 over FOV pixels
    ds = PreparedDataset(prepared)
    yt = np.concatenate([ds.load(i).label[ds.load(i).fov] for i in ds.ids("val")])
    yp = np.concatenate([maps[i][ds.load(i).fov] >= 0.5 for i in ds.ids("val")])
    assert metrics["best_val_dice"] == pytest.approx(f1_score(yt, yp), abs=1e-5)
    hist = _check_history(paths["history_path"])
    assert hist["val_dice"].iloc[0] == pytest.approx(metrics["best_val_dice"], abs=1e-5)
    assert 0.0 < hist["val_loss"].iloc[0] < 5.0


def _bright(prepared: Path, split_ids: dict[str, list[str]], contrast: dict[str, float]) -> None:
    """Rewrite images so that vessel contrast differs per split (val vs test)."""
    seed = 0
    for split, ids in split_ids.items():
        for id_ in ids:
            _, label, fov = line_scene(seed, 48)
            rng = np.random.default_rng(100 + seed)
            image = np.clip(90 + contrast[split] * label + rng.normal(0, 12, label.shape), 0, 255).astype(np.uint8)
            write_item(prepared, id_, image, label, fov)
            seed += 1


def test_vesselness_threshold_is_chosen_on_validation_only(tmp_path: Path) -> None:
    prepared = make_prepared(tmp_path / "prepared", n_train=2, n_val=2, n_test=2)
    ids = {s: PreparedDataset(prepared).ids(s) for s in ("train", "val", "test")}
    _bright(prepared, ids, {"train": 80.0, "val": 80.0, "test": 15.0})  # faint vessels in test only
    model = ModelParams(name="vesselness", vesselness={"sigmas": (1.0, 2.0), "black_ridges": False})
    paths = _paths(tmp_path)
    metrics = fit_classical(model=model, seed=0, prepared_dir=prepared, **paths)

    ds = PreparedDataset(prepared)

    def chosen_on(split: str) -> float:
        items = ds.items(split)
        resp = [frangi_vesselness(it.image, it.fov, sigmas=(1.0, 2.0), black_ridges=False) for it in items]
        return choose_threshold(resp, [it.label for it in items], [it.fov for it in items])

    t_val, t_test = chosen_on("val"), chosen_on("test")
    assert abs(t_val - t_test) > 1e-3, "the construction must make val and test disagree"
    assert metrics["threshold"] == pytest.approx(t_val, abs=1e-6)
    assert float(torch.load(paths["model_path"], weights_only=True)["state_dict"]["threshold"]) == pytest.approx(t_val)

    # changing the test images must not change what was fitted
    shutil.copytree(prepared, tmp_path / "prepared2")
    _bright(tmp_path / "prepared2", ids, {"train": 80.0, "val": 80.0, "test": 200.0})
    paths2 = _paths(tmp_path / "second")
    assert (
        fit_classical(model=model, seed=0, prepared_dir=tmp_path / "prepared2", **paths2)["threshold"]
        == metrics["threshold"]
    )

    out = tmp_path / "predictions"
    predict_classical(model_path=paths["model_path"], prepared_dir=prepared, out_dir=out, threshold=0.5)
    maps = _check_predictions(out, prepared, 0.5)
    # the mask at predict.threshold 0.5 is exactly "raw vesselness >= validated threshold"
    for split in ("val", "test"):
        for it in ds.items(split):
            v = frangi_vesselness(it.image, it.fov, sigmas=(1.0, 2.0), black_ridges=False)
            np.testing.assert_array_equal(maps[it.id] >= 0.5, v >= t_val)
    _check_history(paths["history_path"])


def test_vesselness_probability_mapping_is_monotone_and_exact_at_threshold() -> None:
    rng = np.random.default_rng(0)
    for t in (0.0, 1e-4, 0.137, 0.5, 0.93, 1.0):
        v = np.concatenate([rng.random(5000), [0.0, 1.0, t], np.nextafter(t, [0.0, 1.0])])
        v = np.clip(v, 0, 1)
        p = vesselness_to_probability(v, t)
        assert p.dtype == np.float32 and p.min() >= 0.0 and p.max() <= 1.0
        np.testing.assert_array_equal(p >= 0.5, v >= t)
        order = np.argsort(v, kind="stable")
        assert (np.diff(p[order].astype(np.float64)) >= 0).all()


def test_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="model file not found"):
        predict_classical(model_path=tmp_path / "none.pt", prepared_dir=tmp_path, out_dir=tmp_path / "o", threshold=0.5)
    torch.save({"format": "vesselseg-model/1", "config": {"name": "unet"}, "state_dict": {}}, tmp_path / "u.pt")
    with pytest.raises(DataError, match="not a classical baseline"):
        get_family("knn").load_predictor(tmp_path / "u.pt", predict=PredictParams(), device="cpu", amp=False)
    rgb = tmp_path / "rgb"
    make_prepared(rgb, n_train=2, n_val=1, n_test=1, size=32)
    for id_ in PreparedDataset(rgb).ids("val"):
        it = PreparedDataset(rgb).load(id_)
        write_item(rgb, id_, np.repeat(it.image[..., None], 3, axis=2), it.label, it.fov)
    with pytest.raises(DataError, match="grey images"):
        fit_classical(model=ModelParams(name="vesselness"), seed=0, prepared_dir=rgb, **_paths(tmp_path))
