"""The resnet-patch recipe: centre-pixel training on the patch stage's output, grid prediction."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from tests.helpers import make_prepared
from vesselseg import imagefiles
from vesselseg.errors import ParamsError
from vesselseg.families.resnet_patch import CentreBatches, grid_stride, predict_probability_map
from vesselseg.inference.predict import run_predict
from vesselseg.models import load_model
from vesselseg.models.resnet_patch import ResNetPatch
from vesselseg.params import ModelParams, PredictParams, TrainParams
from vesselseg.patches import run_patches
from vesselseg.prepared import PreparedDataset

torch.set_num_threads(1)

PATCH = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pc")
    prepared = make_prepared(root / "prepared", n_train=3, n_val=1, n_test=2, size=40)
    run_patches(
        prepared_dir=prepared,
        out_dir=root / "patches",
        size=PATCH,
        per_image=24,
        val_per_image=16,
        sampling="foreground",
        foreground_fraction=0.5,
        augment_copies=0,
        rotate_limit=0.0,
        scale_limit=0.0,
        seed=0,
    )
    return prepared, root / "patches"


def _train(**kw) -> TrainParams:
    base = dict(epochs=1, batch_size=16, loss="bce", device="cpu", threads=1, amp=False, lr=1e-3)
    return TrainParams(**{**base, **kw})


def _fit(tmp: Path, data: tuple[Path, Path], model: ModelParams, train: TrainParams) -> tuple[dict, dict[str, Path]]:
    from vesselseg.families.base import TrainJob
    from vesselseg.families.resnet_patch import FAMILY
    from vesselseg.params import parse_params

    paths = {
        "model_path": tmp / "model.pt",
        "checkpoint_path": tmp / "ckpt.pt",
        "history_path": tmp / "history.csv",
        "metrics_path": tmp / "metrics.json",
    }
    job = TrainJob(
        params=parse_params({"seed": 0, "model": model, "train": train}),
        prepared_dir=data[0],
        patch_dir=data[1],
        model_extra={"recipe": "resnet-patch"},
        **paths,
    )
    return FAMILY.fit(job), paths


class CentreEcho(nn.Module):
    """A stand-in classifier whose probability is the centre pixel's intensity."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1] // 2
        return torch.logit(x[:, 0, c, c].clamp(1e-6, 1 - 1e-6))[:, None]


def test_centre_batches_pick_the_centre_pixel() -> None:
    class Fake:
        def __len__(self) -> int:
            return 1

        def epoch(self, epoch: int):
            y = torch.zeros(2, 1, 5, 5)
            y[0, 0, 2, 2] = 1
            m = torch.ones(2, 1, 5, 5)
            m[1, 0, 2, 2] = 0
            yield torch.zeros(2, 1, 5, 5), y, m

    ((x, y, m),) = list(CentreBatches(Fake(), 5).epoch(1))
    assert y.tolist() == [[1.0], [0.0]] and m.tolist() == [[1.0], [0.0]] and x.shape == (2, 1, 5, 5)


@pytest.mark.parametrize("stride", [1, 3, 7])
def test_grid_prediction_matches_centres_and_bilinear_interpolation(stride: int) -> None:
    h, w = 23, 30
    rr, cc = np.mgrid[:h, :w]
    ramp = (20 + 4 * rr + 5 * cc).astype(np.uint8)  # linear: bilinear interpolation reproduces it exactly
    probs = predict_probability_map(CentreEcho(), ramp, patch_size=PATCH, stride=stride, batch_size=64)
    assert probs.shape == (h, w) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, ramp / 255.0, atol=2e-5)
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (h, w)).astype(np.uint8)
    probs = predict_probability_map(CentreEcho(), noise, patch_size=PATCH + 1, stride=stride, batch_size=7)
    rows = [*range(0, h, stride), h - 1]
    cols = [*range(0, w, stride), w - 1]
    np.testing.assert_allclose(probs[np.ix_(rows, cols)], noise[np.ix_(rows, cols)] / 255.0, atol=2e-5)
    assert grid_stride(96, 32) == 12 and grid_stride(4, 32) == 1 and grid_stride(None, 32) == 8


def test_one_epoch_then_prediction_of_the_right_shape(tmp_path: Path, data: tuple[Path, Path]) -> None:
    model = ModelParams(name="resnet_patch", resnet_patch={"width": 4})
    metrics, paths = _fit(tmp_path, data, model, _train())
    hist = pd.read_csv(paths["history_path"])
    assert list(hist.columns) == ["epoch", "train_loss", "val_loss", "val_dice", "val_iou", "lr", "seconds"]
    assert hist["epoch"].tolist() == [1] and np.isfinite(hist.drop(columns="epoch").to_numpy()).all()
    assert 0 < hist["train_loss"].iloc[0] < 5 and 0.0 <= hist["val_dice"].iloc[0] <= 1.0
    assert json.loads(paths["metrics_path"].read_text()) == metrics
    assert metrics["epochs_run"] == 1 and metrics["patch_size"] == PATCH
    assert not paths["checkpoint_path"].exists()
    net, meta = load_model(paths["model_path"])
    assert isinstance(net, ResNetPatch) and meta["extra"]["patch_size"] == PATCH
    assert meta["extra"]["recipe"] == "resnet-patch" and meta["config"]["width"] == 4

    out = tmp_path / "pred"
    stats = run_predict(
        model_path=paths["model_path"],
        prepared_dir=data[0],
        out_dir=out,
        device="cpu",
        predict=PredictParams(window=24, overlap=0.5, weighting="gaussian", batch_size=32, threshold=0.5),
    )
    assert stats["stride"] == 3 and stats["n_images"] == 3
    ds = PreparedDataset(data[0])
    for split in ("val", "test"):
        for id_ in ds.ids(split):
            p = np.load(out / split / "probs" / f"{id_}.npy")
            assert p.shape == (40, 40) and p.dtype == np.float32 and p.min() >= 0.0 and p.max() <= 1.0
            mask = imagefiles.read_image(out / split / "masks" / f"{id_}.png")
            np.testing.assert_array_equal(mask == 255, p >= 0.5)
            # at grid centres the map is the network's own output for that patch
            image = ds.load(id_).image
            padded = np.pad(image, PATCH, mode="reflect")
            r, c = 3, 6
            patch = padded[
                r + PATCH - PATCH // 2 : r + PATCH - PATCH // 2 + PATCH,
                c + PATCH - PATCH // 2 : c + PATCH - PATCH // 2 + PATCH,
            ]
            with torch.no_grad():
                ref = torch.sigmoid(net(torch.from_numpy(patch / np.float32(255))[None, None].float()))[0, 0]
            assert p[r, c] == pytest.approx(float(ref), abs=1e-5)


def test_imagenet_weights_are_the_starting_point(
    tmp_path: Path, data: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """model.resnet_patch.weights goes through load_imagenet_weights (tested with a real
    ResNet34 file in test_models) before training; a spy keeps this test small."""
    import vesselseg.models.resnet_patch as rp

    calls: list[Path] = []

    def fake_loader(net: ResNetPatch, path: Path) -> list[str]:
        calls.append(Path(path))
        with torch.no_grad():
            net.conv1.weight.fill_(0.125)
        return ["fc.weight", "fc.bias"]

    monkeypatch.setattr(rp, "load_imagenet_weights", fake_loader)
    model = ModelParams(name="resnet_patch", resnet_patch={"width": 4, "weights": str(tmp_path / "r34.pth")})
    _, paths = _fit(tmp_path, data, model, _train(lr=1e-9))  # a step this small leaves the weights in place
    assert calls == [tmp_path / "r34.pth"]
    net, _ = load_model(paths["model_path"])
    np.testing.assert_allclose(net.conv1.weight.detach().numpy(), 0.125, atol=1e-6)


def test_loss_must_be_bce(tmp_path: Path, data: tuple[Path, Path]) -> None:
    with pytest.raises(ParamsError, match="train.loss"):
        _fit(tmp_path, data, ModelParams(name="resnet_patch", resnet_patch={"width": 4}), _train(loss="bce+dice"))
