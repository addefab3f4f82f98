"""The cross-dataset command on two generated datasets: every cell scored as an independent computation says."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sklearn.metrics import f1_score, roc_auc_score

from tests.helpers import ROOT, make_prepared
from vesselseg.imagefiles import write_png
from vesselseg.models import build_model, save_model
from vesselseg.prepared import PreparedDataset

UNET = {"name": "unet", "in_channels": 1, "out_channels": 1, "depth": 1, "base_channels": 4, "dropout": 0.0}


def _model(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    save_model(path, build_model(UNET), UNET)
    return path


def _harmonised(root: Path) -> Path:
    """A dataset prepared at half size that kept its native labels (as prepare.fov_diameter does)."""
    import cv2

    native = make_prepared(root / "native-src", n_train=1, n_val=1, n_test=2, size=48)
    ds = PreparedDataset(native)
    small = make_prepared(root / "prepared", n_train=1, n_val=1, n_test=2, size=24)
    sizes = {}
    for id_ in ds.ids("test"):
        it = ds.load(id_)
        write_png(small / "images" / f"{id_}.png", cv2.resize(it.image, (24, 24), interpolation=cv2.INTER_AREA))
        write_png(small / "native" / "labels" / f"{id_}.png", it.label)
        write_png(small / "native" / "fov" / f"{id_}.png", it.fov)
        sizes[id_] = [48, 48]
    (small / "native_sizes.json").write_text(json.dumps(sizes))
    return small


def test_two_models_on_two_datasets(tmp_path: Path) -> None:
    from vesselseg.cli import cli

    a = make_prepared(tmp_path / "a" / "prepared", size=48)
    b = _harmonised(tmp_path / "b")
    m1, m2 = _model(tmp_path / "m1.pt", 0), _model(tmp_path / "m2.pt", 1)
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    out = tmp_path / "reports" / "cross"
    res = CliRunner().invoke(
        cli,
        [
            "--params",
            str(params),
            "crossdataset",
            "--model",
            f"one={m1}",
            "--model",
            f"two={m2}",
            "--dataset",
            f"A={a}",
            "--dataset",
            f"B={b}",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output + str(res.exception)
    import pandas as pd

    df = pd.read_csv(out.with_suffix(".csv"))
    assert sorted(zip(df.model, df.dataset, strict=True)) == [("one", "A"), ("one", "B"), ("two", "A"), ("two", "B")]
    md = out.with_suffix(".md").read_text()
    assert "| trained on \\ scored on | A | B |" in md and "clDice" in md
    assert f"--model one={m1} --dataset B={b} --split test" in md and "B: test (2 images)" in md
    assert df.set_index(["model", "dataset"]).loc[("one", "B"), "native"]
    # an independent computation of one harmonised cell: predict, map back to 48 px, score the native pixels
    from vesselseg.inference.predict import predict_image
    from vesselseg.models import load_model
    from vesselseg.preprocess.spec import to_native

    net, _ = load_model(m1)
    ds = PreparedDataset(b)
    ys, ps = [], []
    for id_ in ds.ids("test"):
        probs = predict_image(
            net,
            ds.load(id_).image,
            window=None,
            overlap=0.125,
            weighting="gaussian",
            batch_size=4,
            device="cpu",
            amp=False,
            channels_last=True,
        )
        probs = to_native(probs, (48, 48))
        from vesselseg.imagefiles import read_mask

        label = read_mask(b / "native" / "labels" / f"{id_}.png")
        fov = read_mask(b / "native" / "fov" / f"{id_}.png")
        ys.append(label[fov])
        ps.append(probs[fov])
    y, p = np.concatenate(ys), np.concatenate(ps)
    cell = df.set_index(["model", "dataset"]).loc[("one", "B")]
    assert cell["f1"] == pytest.approx(f1_score(y, p >= 0.5), abs=1e-4)
    assert cell["auc"] == pytest.approx(roc_auc_score(y, p), abs=2e-3)


def test_unknown_paths_and_splits_are_one_line_errors(tmp_path: Path) -> None:
    from vesselseg.crossdataset import parse_named
    from vesselseg.errors import DataError

    with pytest.raises(DataError, match=r"nope\.pt: model file not found"):
        parse_named([f"x={tmp_path / 'nope.pt'}"], "model file")
    a = make_prepared(tmp_path / "prepared")
    from vesselseg.crossdataset import run_crossdataset
    from vesselseg.params import PredictParams

    with pytest.raises(DataError, match="unknown split 'tset'"):
        run_crossdataset(
            models={"m": _model(tmp_path / "m.pt", 0)},
            datasets={"a": a},
            out=tmp_path / "o",
            predict=PredictParams(),
            split="tset",
        )


def test_split_per_dataset(tmp_path: Path) -> None:
    """An unseen dataset is scored on all its images, the training one on its test split."""
    from vesselseg.crossdataset import run_crossdataset
    from vesselseg.errors import DataError
    from vesselseg.params import PredictParams

    a = make_prepared(tmp_path / "a" / "prepared")  # 4 train, 2 val, 2 test
    b = make_prepared(tmp_path / "b" / "prepared")
    m = _model(tmp_path / "m.pt", 0)
    cells = run_crossdataset(
        models={"m": m}, datasets={"A": a, "B": b}, out=tmp_path / "o", predict=PredictParams(), splits={"B": "all"}
    )
    assert [(c.dataset, c.split, c.n_images) for c in cells] == [("A", "test", 2), ("B", "all", 8)]
    with pytest.raises(DataError, match="no dataset named 'Z'"):
        run_crossdataset(
            models={"m": m}, datasets={"A": a}, out=tmp_path / "o", predict=PredictParams(), splits={"Z": "all"}
        )
