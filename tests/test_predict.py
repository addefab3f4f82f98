"""predict_image and run_predict against independent numpy references.

A 1x1-conv model has no spatial context, so its stitched prediction must equal the
pointwise formula sigmoid(a * image / 255 + b) everywhere, whatever the windows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from vesselseg import imagefiles
from vesselseg.errors import DataError, ParamsError
from vesselseg.inference import predict_image, resolve_device
from vesselseg.inference.predict import run_predict as _run_predict
from vesselseg.inference.sliding_window import fit_window
from vesselseg.params import PredictParams
from vesselseg.prepared import write_item

torch.set_num_threads(1)

SW = dict(window=16, overlap=0.5, weighting="gaussian", batch_size=4, device="cpu", amp=True)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _pointwise(in_ch: int, out_ch: int, seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    net = nn.Conv2d(in_ch, out_ch, kernel_size=1)
    with torch.no_grad():
        net.weight.uniform_(-4, 4)
        net.bias.uniform_(-1, 1)
    return net


def _logits_np(net: nn.Conv2d, image: np.ndarray) -> np.ndarray:
    """(out_ch, H, W) logits of a 1x1 conv, computed in float64 numpy."""
    x = (image[..., None] if image.ndim == 2 else image).astype(np.float64) / 255.0  # H, W, C
    w = net.weight.detach().double().numpy()[:, :, 0, 0]  # out, in
    b = net.bias.detach().double().numpy()
    return np.einsum("hwc,oc->ohw", x, w) + b[:, None, None]


def _image(h: int, w: int, seed: int, channels: int = 0) -> np.ndarray:
    shape = (h, w) if channels == 0 else (h, w, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize("weighting", ["constant", "gaussian"])
def test_sigmoid_head_matches_pointwise_formula(weighting: str) -> None:
    net, img = _pointwise(1, 1), _image(37, 45, 1)
    probs = predict_image(net, img, **{**SW, "weighting": weighting})
    assert probs.shape == (37, 45) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, _sigmoid(_logits_np(net, img)[0]), atol=1e-6, rtol=0)


def test_softmax_head_and_rgb_input() -> None:
    net, img = _pointwise(3, 2, seed=2), _image(30, 41, 3, channels=3)
    probs = predict_image(net, img, **SW)
    logits = _logits_np(net, img)
    expected = np.exp(logits[1]) / np.exp(logits).sum(axis=0)
    np.testing.assert_allclose(probs, expected, atol=1e-6, rtol=0)


def test_whole_image_window_and_eval_mode_restored() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Dropout(0.5), nn.Conv2d(4, 1, 3, padding=1))
    net.train()
    img = _image(24, 20, 3)
    probs = predict_image(net, img, **{**SW, "window": (24, 20)})
    assert net.training  # the caller's mode is restored
    np.testing.assert_array_equal(predict_image(net, img, **{**SW, "window": None}), probs)  # None = whole image
    net.eval()
    with torch.no_grad():
        expected = torch.sigmoid(net(torch.from_numpy(img).float()[None, None] / 255.0))[0, 0].numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-6, rtol=0)  # dropout was off
    assert probs.min() >= 0.0 and probs.max() <= 1.0


def test_window_longer_than_the_image_spans_it_whole() -> None:
    """A window side longer than the image side covers that side in one window (no padding):
    the result equals the windows of the clamped size, and a window covering both sides is
    exactly the whole-image pass."""
    net = _pointwise(1, 1)
    img = _image(12, 30, 0)
    np.testing.assert_array_equal(
        predict_image(net, img, **{**SW, "window": 16}), predict_image(net, img, **{**SW, "window": (12, 16)})
    )
    np.testing.assert_array_equal(
        predict_image(net, img, **{**SW, "window": 1024}), predict_image(net, img, **{**SW, "window": None})
    )
    assert (
        fit_window(1024, 12, 30) == (12, 30)
        and fit_window((8, 64), 12, 30) == (8, 30)
        and fit_window(5, 12, 30) == (5, 5)
    )


def test_predict_image_errors() -> None:
    net = _pointwise(1, 1)
    with pytest.raises(ValueError, match=r"image must be uint8 \(H, W\) or \(H, W, C\), got float32"):
        predict_image(net, np.zeros((20, 20), np.float32), **SW)
    with pytest.raises(ValueError, match=r"model must output 1 \(sigmoid\) or 2 \(softmax\) channels, got 3"):
        predict_image(_pointwise(1, 3), _image(20, 20, 0), **SW)


def _prepared(root: Path, sizes: dict[str, tuple[int, int]], split: dict[str, list[str]]) -> Path:
    for i, (id_, (h, w)) in enumerate(sizes.items()):
        write_item(root, id_, _image(h, w, 10 + i), np.zeros((h, w), bool), np.ones((h, w), bool))
    (root / "split.json").write_text(json.dumps({"dataset": "test", "train": [], **split}))
    return root


SIZES = {"a": (40, 36), "b": (33, 50), "c": (20, 20), "d": (24, 31)}
SPLIT = {"val": ["a"], "test": ["b", "c", "d"]}
RUN = dict(window=20, overlap=0.5, weighting="gaussian", batch_size=8, threshold=0.4, device="cpu", amp=True)


def run_predict(
    *,
    model_path: Path,
    prepared_dir: Path,
    out_dir: Path,
    device: str = "cpu",
    amp: bool = True,
    splits: tuple[str, ...] = ("val", "test"),
    **predict: object,
) -> dict:
    """The writer with predict.* as keywords; unvalidated, so run_predict's own checks are what is tested."""
    return _run_predict(
        model_path=model_path,
        prepared_dir=prepared_dir,
        out_dir=out_dir,
        device=device,
        amp=amp,
        splits=splits,
        predict=PredictParams.model_construct(**{**PredictParams().model_dump(), **predict}),
    )


def _fake_model(
    monkeypatch: pytest.MonkeyPatch,
    model_path: Path,
    net: nn.Module | None,
    in_channels: int = 1,
    loaded: list[Path] | None = None,
) -> None:
    """Make ``model_path`` load as ``net`` through the U-Net family's predictor (the file is a stub)."""
    from vesselseg.families.unet import FAMILY, WindowPredictor

    model_path.write_bytes(b"stub")

    def load_predictor(path: Path, *, predict: PredictParams, device: str, amp: bool) -> WindowPredictor:
        if loaded is not None:
            loaded.append(path)
        return WindowPredictor(net, {"config": {"in_channels": in_channels}}, predict, resolve_device(device), amp)

    monkeypatch.setattr("vesselseg.families.family_of_model_file", lambda path: FAMILY)
    monkeypatch.setattr(FAMILY, "load_predictor", load_predictor)


def test_run_predict_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prepared = _prepared(tmp_path / "prepared", SIZES, SPLIT)
    net = _pointwise(1, 1, seed=5)
    _fake_model(monkeypatch, tmp_path / "m.pt", net)
    out = tmp_path / "pred"
    (out / "test" / "probs").mkdir(parents=True)
    (out / "test" / "probs" / "stale.npy").write_bytes(b"old")  # a previous run's image no longer in the split

    stats = run_predict(model_path=tmp_path / "m.pt", prepared_dir=prepared, out_dir=out, **RUN)

    assert stats["n_images"] == 4 and stats["splits"]["test"]["n_images"] == 3 and stats["device"] == "cpu"
    assert stats["amp_dtype"] == "float32"  # no autocast on the CPU
    assert stats["seconds_per_image"] > 0
    assert not (out / "test" / "probs" / "stale.npy").exists()
    for split, ids in SPLIT.items():
        for id_ in ids:
            probs = np.load(out / split / "probs" / f"{id_}.npy")
            assert probs.dtype == np.float32 and probs.shape == SIZES[id_]
            image = imagefiles.read_image(prepared / "images" / f"{id_}.png")
            np.testing.assert_allclose(probs, _sigmoid(_logits_np(net, image)[0]), atol=1e-6, rtol=0)
            mask = imagefiles.read_image(out / split / "masks" / f"{id_}.png")
            assert set(np.unique(mask)) <= {0, 255}
            np.testing.assert_array_equal(mask == 255, probs >= RUN["threshold"])
    assert not list(out.rglob(".tmp-*"))


@pytest.mark.parametrize("channels_last", [True, False])
def test_run_predict_with_saved_unet(tmp_path: Path, channels_last: bool) -> None:
    """The stage equals predict_image on the model in the layout predict.channels_last asks for,
    and the two layouts agree to float rounding (NHWC convs sum in another order)."""
    from vesselseg.device import to_channels_last
    from vesselseg.models import UNet, load_model, save_model

    config = {"name": "unet", "in_channels": 1, "out_channels": 1, "depth": 2, "base_channels": 4, "dropout": 0.0}
    torch.manual_seed(0)
    save_model(tmp_path / "model.pt", UNet(**{k: v for k, v in config.items() if k != "name"}), config)
    prepared = _prepared(tmp_path / "prepared", SIZES, SPLIT)
    run_predict(
        model_path=tmp_path / "model.pt",
        prepared_dir=prepared,
        out_dir=tmp_path / "pred",
        splits=("test",),
        channels_last=channels_last,
        **RUN,
    )
    assert not (tmp_path / "pred" / "val").exists()
    model, _ = load_model(tmp_path / "model.pt")
    model_cl, _ = load_model(tmp_path / "model.pt")
    assert to_channels_last(model_cl)
    kw = {k: v for k, v in RUN.items() if k != "threshold"}
    for id_ in SPLIT["test"]:
        probs = np.load(tmp_path / "pred" / "test" / "probs" / f"{id_}.npy")
        assert probs.shape == SIZES[id_] and probs.min() >= 0.0 and probs.max() <= 1.0
        image = imagefiles.read_image(prepared / "images" / f"{id_}.png")
        nchw = predict_image(model, image, **kw)
        nhwc = predict_image(model_cl, image, channels_last=True, **kw)
        np.testing.assert_array_equal(probs, nhwc if channels_last else nchw)
        np.testing.assert_allclose(nhwc, nchw, atol=1e-5, rtol=0)


def test_run_predict_checks_every_image_before_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prepared = _prepared(tmp_path / "prepared", SIZES, SPLIT)
    loaded: list[Path] = []
    _fake_model(monkeypatch, tmp_path / "m.pt", None, loaded=loaded)
    out = tmp_path / "pred"
    with pytest.raises(ParamsError, match=r"predict\.overlap must be >= 0 and < 1, got 1\.5"):
        run_predict(model_path=tmp_path / "m.pt", prepared_dir=prepared, out_dir=out, **{**RUN, "overlap": 1.5})
    with pytest.raises(ParamsError, match=r"predict\.threshold must be > 0 and < 1, got 1\.0"):
        run_predict(model_path=tmp_path / "m.pt", prepared_dir=prepared, out_dir=out, **{**RUN, "threshold": 1.0})
    (prepared / "images" / "c.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"c\.png: not a readable image"):
        run_predict(model_path=tmp_path / "m.pt", prepared_dir=prepared, out_dir=out, **RUN)
    assert loaded == [] and not out.exists()


def test_run_predict_channel_mismatch_and_missing_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prepared = _prepared(tmp_path / "prepared", SIZES, SPLIT)
    with pytest.raises(DataError, match=r"m\.pt: model file not found"):
        run_predict(model_path=tmp_path / "m.pt", prepared_dir=prepared, out_dir=tmp_path / "pred", **RUN)
    _fake_model(monkeypatch, tmp_path / "m.pt", _pointwise(3, 1), in_channels=3)
    with pytest.raises(DataError, match=r"a\.png: image has 1 channel\(s\) but the model expects 3"):
        run_predict(model_path=tmp_path / "m.pt", prepared_dir=prepared, out_dir=tmp_path / "pred", **RUN)


def test_resolve_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ParamsError, match=r"device 'cuda' requested but CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ParamsError, match=r"got 'cpux'; did you mean 'cpu'\?"):
        resolve_device("cpux")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    net, img = _pointwise(1, 1), _image(37, 45, 1)
    cpu = predict_image(net, img, **SW)
    net = net.cuda()
    fp32 = predict_image(net, img, **{**SW, "device": "cuda", "amp": False})
    np.testing.assert_allclose(fp32, cpu, atol=1e-5, rtol=0)
    mixed = predict_image(net, img, **{**SW, "device": "cuda", "amp": True})  # bf16/fp16 autocast
    np.testing.assert_allclose(mixed, cpu, atol=2e-2, rtol=0)


def test_run_predict_whole_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prepared = _prepared(tmp_path / "prepared", SIZES, SPLIT)
    net = _pointwise(1, 1, seed=6)
    _fake_model(monkeypatch, tmp_path / "m.pt", net)
    run_predict(
        model_path=tmp_path / "m.pt", prepared_dir=prepared, out_dir=tmp_path / "pred", **{**RUN, "window": None}
    )
    for id_ in SPLIT["test"]:  # image c (20x20) is smaller than the 24 px window that fails above
        probs = np.load(tmp_path / "pred" / "test" / "probs" / f"{id_}.npy")
        image = imagefiles.read_image(prepared / "images" / f"{id_}.png")
        np.testing.assert_allclose(probs, _sigmoid(_logits_np(net, image)[0]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("tta", ["flips", "d4"])
def test_run_predict_applies_test_time_augmentation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tta: str) -> None:
    """predict.tta goes through the family's predictor: the written map is the TTA mean of predict_image."""
    from vesselseg.inference.tta import predict_with_tta

    prepared = _prepared(tmp_path / "prepared", SIZES, SPLIT)
    net = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1))  # not flip-equivariant: TTA changes its output
    torch.manual_seed(3)
    _fake_model(monkeypatch, tmp_path / "m.pt", net)
    run_predict(model_path=tmp_path / "m.pt", prepared_dir=prepared, out_dir=tmp_path / "pred", **{**RUN, "tta": tta})
    kw = {k: v for k, v in RUN.items() if k != "threshold"}
    for id_ in SPLIT["test"]:
        image = imagefiles.read_image(prepared / "images" / f"{id_}.png")
        expect = predict_with_tta(lambda im: predict_image(net, im, **kw), image, tta)
        plain = predict_image(net, image, **kw)
        got = np.load(tmp_path / "pred" / "test" / "probs" / f"{id_}.npy")
        np.testing.assert_allclose(got, expect, atol=1e-6)
        assert np.abs(got - plain).max() > 1e-4
