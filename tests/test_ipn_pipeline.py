"""IPN through the pipeline: volume loading, block training, volume prediction and stitching."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from vesselseg.errors import DataError, ParamsError
from vesselseg.params import DataParams, ModelParams, PredictParams, PrepareParams, TrainParams

torch.set_num_threads(1)

DEPTH, WIDTH, N_BSCANS, SLAB = 24, 20, 16, (8, 16)
IPN_MODEL = ModelParams(name="ipn", ipn={"channels": 4, "n_blocks": 2, "block": 12})


def _write_slices(folder: Path, bscans: list[np.ndarray], ext: str = ".bmp") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, b in enumerate(bscans):
        ok, buf = cv2.imencode(ext, b)
        assert ok
        p = folder / f"{k + 1}{ext}"
        buf.tofile(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def bscans(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], np.ndarray]:
    """Three random B-scans (depth 8, width 5) as BMP files and as the stack [depth, x, j]."""
    rng = np.random.default_rng(3)
    scans = [rng.integers(0, 256, (8, 5), dtype=np.uint8) for _ in range(3)]
    paths = _write_slices(tmp_path_factory.mktemp("bscans"), scans)
    return paths, np.stack(scans, axis=-1)


def test_load_volume_orientation_and_slab(bscans) -> None:
    from vesselseg.preprocess.volume import load_volume

    paths, stack = bscans
    full = load_volume(paths, depth=8, slab=None)
    assert full.dtype == np.uint8 and full.shape == (8, 5, 3)
    # [:, x, j] is A-scan x of B-scan j, the en-face orientation of the labels
    np.testing.assert_array_equal(full, stack)
    np.testing.assert_array_equal(load_volume(paths, depth=4, slab=(2, 6)), stack[2:6])


def test_load_volume_general_decoder_path(tmp_path: Path, bscans) -> None:
    """PNG slices go through OpenCV instead of the BMP fast path: same result."""
    from vesselseg.preprocess.volume import load_volume

    _, stack = bscans
    paths = _write_slices(tmp_path, [stack[:, :, j] for j in range(3)], ext=".png")
    np.testing.assert_array_equal(load_volume(paths, depth=6, slab=(1, 7)), stack[1:7])


def test_load_volume_resizes_depth_only(bscans) -> None:
    from vesselseg.preprocess.volume import load_volume, resize_depth

    paths, stack = bscans
    s = stack.astype(np.float64)
    # shrink 8 -> 4 rows: area interpolation = mean of each pair of rows
    expect = np.rint(s.reshape(4, 2, 5, 3).mean(axis=1))
    np.testing.assert_array_equal(load_volume(paths, depth=4, slab=None), expect.astype(np.uint8))
    # enlarge 4 -> 8 rows: linear with half-pixel centres, clamped at the ends
    part = s[2:6, :, 0]
    src = np.clip((np.arange(8) + 0.5) * 4 / 8 - 0.5, 0, 3)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, 3)
    ref = part[lo] * (1 - (src - lo))[:, None] + part[hi] * (src - lo)[:, None]
    np.testing.assert_allclose(resize_depth(part, 8), ref, atol=1e-4)
    got = load_volume(paths, depth=8, slab=(2, 6))[:, :, 0].astype(np.float64)
    assert np.abs(got - ref).max() <= 0.5 + 1e-4


def test_load_volume_mean_matches_projection(bscans) -> None:
    from vesselseg.preprocess.projection import project_volume
    from vesselseg.preprocess.volume import load_volume

    paths, _ = bscans
    proj = project_volume(paths, method="mean", slab=(2, 6))
    assert proj.shape == (5, 3)
    np.testing.assert_allclose(load_volume(paths, depth=4, slab=(2, 6)).mean(axis=0), proj, atol=1e-5)
    # halving the depth averages pairs: the mean moves by at most the rounding
    assert np.abs(load_volume(paths, depth=2, slab=(2, 6)).mean(axis=0) - proj).max() <= 0.5


def test_load_volume_errors(tmp_path: Path, bscans) -> None:
    from vesselseg.preprocess.volume import load_volume

    paths, _ = bscans
    with pytest.raises(ParamsError, match="prepare.slab"):
        load_volume(paths, depth=4, slab=(4, 12))
    odd = _write_slices(tmp_path, [np.zeros((8, 6), np.uint8)])
    with pytest.raises(DataError, match="one size"):
        load_volume([*paths, odd[0]], depth=4, slab=None)
    with pytest.raises(ParamsError, match="volume_depth"):
        load_volume(paths, depth=0, slab=None)


# -- pipeline on a tiny synthetic OCTA set -------------------------------------------


def _prepare(root: Path, volumes: bool = True) -> Path:
    from vesselseg.data.adapters import mark_raw
    from vesselseg.data.synthetic_octa import generate_octa_dataset
    from vesselseg.prepare import run_prepare

    raw = root / "raw"
    if not raw.exists():
        generate_octa_dataset(
            raw, n_subjects=6, n_bscans=N_BSCANS, depth=DEPTH, width=WIDTH, slab=SLAB, seed=0, progress=False
        )
        mark_raw(raw, "synthetic")
    out = root / ("prepared" if volumes else "prepared_2d")
    run_prepare(
        raw_dir=raw,
        out_dir=out,
        data=DataParams(dataset="synthetic", val_fraction=0.2, test_fraction=0.2),
        prepare=PrepareParams(slab=SLAB, volumes=volumes, volume_depth=4, equalize="none"),
    )
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _prepare(tmp_path_factory.mktemp("octa"))


def test_prepared_volumes_line_up_with_labels(prepared: Path) -> None:
    from vesselseg.imagefiles import list_slices
    from vesselseg.prepared import PreparedDataset
    from vesselseg.preprocess.projection import project_volume

    ds = PreparedDataset(prepared)
    raw = prepared.parent / "raw" / "OCTA"
    for id_ in ds.ids("train"):
        vol = np.load(prepared / "volumes" / f"{id_}.npy")
        item = ds.load(id_)
        assert vol.shape == (4, WIDTH, N_BSCANS) == (4, *item.label.shape)
        proj = project_volume(list_slices(raw / id_), method="mean", slab=SLAB)
        assert np.abs(vol.mean(axis=0) - proj).max() <= 0.5 + 1e-4  # 8 slab rows averaged in pairs
        enface = vol.mean(axis=0)
        assert enface[item.label].mean() > enface[~item.label].mean() + 10  # vessels carry the slab's flow


def test_blocks_are_seeded_split_by_rank_and_move_with_labels() -> None:
    from vesselseg.families.ipn import VolumeBlocks, VolumeItem

    rng = np.random.default_rng(0)
    items = []
    for k in range(2):
        label = rng.random((20, 16)) < 0.3
        fov = rng.random((20, 16)) < 0.9
        vol = np.repeat((label * 255).astype(np.uint8)[None], 3, axis=0)  # every A-scan = its label
        items.append(VolumeItem(f"v{k}", vol, label, fov))
    kw = dict(block=8, batch_size=4, flip=True, rotate90=True, seed=5, blocks_per_volume=6)
    one = VolumeBlocks(items, **kw)
    assert one.n_blocks == 12 and len(one) == 3
    np.testing.assert_array_equal(one.plan(2), VolumeBlocks(items, **kw).plan(2))
    assert not np.array_equal(one.plan(2), one.plan(3))
    r0, r1 = (VolumeBlocks(items, **kw, rank=r, world=2).plan(2) for r in (0, 1))
    np.testing.assert_array_equal(np.concatenate([r0, r1]), np.concatenate([one.plan(2)[0::2], one.plan(2)[1::2]]))
    assert set(one.plan(2)[:, 5]) - {0} and one.plan(2)[:, 3].any()  # rotations and flips are drawn
    for x, y, m in one.epoch(2):
        assert x.shape == (4, 1, 3, 8, 8) and y.shape == m.shape == (4, 1, 8, 8)
        torch.testing.assert_close(x.mean(dim=2), y)  # volume and label flipped/rotated together
    # the FOV block comes from the same place as the label block
    v, top, left, fh, fw, rot = (int(a) for a in one.plan(1)[0])
    fov = items[v].fov[top : top + 8, left : left + 8]
    fov = fov[::-1] if fh else fov
    fov = fov[:, ::-1] if fw else fov
    _, _, m = next(iter(one.epoch(1)))
    np.testing.assert_array_equal(m[0, 0].numpy().astype(bool), np.rot90(fov, rot))
    with pytest.raises(ParamsError, match="model.ipn.block"):
        VolumeBlocks(items, **{**kw, "block": 40})


def _fit(prepared: Path, out: Path, logger=None, **train_kw) -> dict:
    from vesselseg.families.base import TrainJob
    from vesselseg.families.ipn import IpnFamily
    from vesselseg.params import Params

    train = {"epochs": 3, "batch_size": 4, "lr": 1e-2, "threads": 1, "patience": 50, **train_kw}
    params = Params(model=IPN_MODEL, train=train, prepare={"volumes": True})
    job = TrainJob(
        params=params,
        prepared_dir=prepared,
        model_path=out / "model.pt",
        checkpoint_path=out / "ckpt.pt",
        history_path=out / "history.csv",
        metrics_path=out / "metrics.json",
        logger=logger,
        model_extra={"recipe": "test"},
    )
    return IpnFamily(blocks_per_volume=6).fit(job)


def test_fit_ipn_learns_and_writes_outputs(prepared: Path, tmp_path: Path) -> None:
    from vesselseg.models import load_model
    from vesselseg.models.ipn import IPN

    metrics = _fit(prepared, tmp_path)
    hist = pd.read_csv(tmp_path / "history.csv")
    assert list(hist.columns) == ["epoch", "train_loss", "val_loss", "val_dice", "val_iou", "lr", "seconds"]
    assert len(hist) == 3 and hist.train_loss.iloc[-1] < hist.train_loss.iloc[0]
    assert metrics["best_epoch"] == int(hist.val_dice.idxmax()) + 1
    assert json.loads((tmp_path / "metrics.json").read_text())["epochs_run"] == 3
    assert not (tmp_path / "ckpt.pt").exists()
    model, meta = load_model(tmp_path / "model.pt")
    assert isinstance(model, IPN) and meta["config"]["depth"] == 4 and meta["config"]["channels"] == 4
    assert meta["extra"]["recipe"] == "test" and meta["extra"]["epoch"] == metrics["best_epoch"]


def test_fit_ipn_resumes_exactly(prepared: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class Killer:
        def log_metrics(self, metrics: dict, step: int | None = None) -> None:
            if step == 1:  # after epoch 1's checkpoint is written
                raise KeyboardInterrupt

    _fit(prepared, tmp_path / "full", epochs=2)
    with pytest.raises(KeyboardInterrupt):
        _fit(prepared, tmp_path / "cut", logger=Killer(), epochs=2)
    assert (tmp_path / "cut" / "ckpt.pt").is_file()
    assert len(pd.read_csv(tmp_path / "cut" / "history.csv")) == 1
    with caplog.at_level("INFO", logger="vesselseg.families.base"):
        _fit(prepared, tmp_path / "cut", epochs=2)
    assert "resuming from" in caplog.text and "at epoch 2" in caplog.text
    a = pd.read_csv(tmp_path / "full" / "history.csv").drop(columns="seconds")
    b = pd.read_csv(tmp_path / "cut" / "history.csv").drop(columns="seconds")
    pd.testing.assert_frame_equal(a, b)


def test_fit_ipn_needs_volumes(tmp_path: Path, prepared: Path) -> None:
    flat = _prepare(prepared.parent, volumes=False)
    with pytest.raises(ParamsError, match="prepare.volumes"):
        _fit(flat, tmp_path)


def test_run_predict_ipn_layout(prepared: Path, tmp_path: Path) -> None:
    from vesselseg.families.ipn import predict_volume
    from vesselseg.imagefiles import read_mask
    from vesselseg.inference.predict import run_predict
    from vesselseg.models import load_model, save_model
    from vesselseg.models.ipn import IPN
    from vesselseg.prepared import PreparedDataset

    torch.manual_seed(0)
    net = IPN(channels=4, n_blocks=2, depth=4)
    for mod in net.modules():  # non-trivial BN statistics so eval mode matters
        if isinstance(mod, torch.nn.BatchNorm3d | torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
    save_model(tmp_path / "model.pt", net, {"name": "ipn", "channels": 4, "n_blocks": 2, "depth": 4})
    out = tmp_path / "pred"
    kw = dict(window=12, overlap=0.5, weighting="gaussian", batch_size=3)
    stats = run_predict(
        model_path=tmp_path / "model.pt",
        prepared_dir=prepared,
        out_dir=out,
        device="cpu",
        amp=False,
        predict=PredictParams(threshold=0.5, **kw),
    )
    ds = PreparedDataset(prepared)
    model, _ = load_model(tmp_path / "model.pt")
    assert stats["n_images"] == len(ds.ids("val")) + len(ds.ids("test"))
    for split in ("val", "test"):
        assert sorted(p.stem for p in (out / split / "probs").iterdir()) == ds.ids(split)
        for id_ in ds.ids(split):
            probs = np.load(out / split / "probs" / f"{id_}.npy")
            assert probs.dtype == np.float32 and probs.shape == (WIDTH, N_BSCANS)
            assert probs.min() >= 0.0 and probs.max() <= 1.0
            np.testing.assert_array_equal(read_mask(out / split / "masks" / f"{id_}.png", probs.shape), probs >= 0.5)
            vol = np.load(prepared / "volumes" / f"{id_}.npy")
            np.testing.assert_allclose(probs, predict_volume(model, vol, device="cpu", amp=False, **kw), atol=1e-6)
    # a window longer than the en-face sides spans the volume whole (never padded)
    vol = np.load(prepared / "volumes" / f"{ds.ids('test')[0]}.npy")
    whole = predict_volume(model, vol, device="cpu", amp=False, **{**kw, "window": (WIDTH, N_BSCANS)})
    np.testing.assert_array_equal(predict_volume(model, vol, device="cpu", amp=False, **{**kw, "window": 64}), whole)


class _LogitOfMean(torch.nn.Module):
    """An IPN-shaped net (N, 1, D, h, w) -> (N, 1, h, w) whose sigmoid is the mean over depth."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.logit(x.mean(dim=2).clamp(1e-6, 1 - 1e-6))


def test_stitching_reproduces_mean_projection() -> None:
    from vesselseg.families.ipn import depth_as_channels, predict_volume
    from vesselseg.inference.sliding_window import sliding_window_inference

    rng = np.random.default_rng(1)
    vol = rng.integers(1, 255, (6, 21, 17), dtype=np.uint8)
    x = torch.from_numpy(vol.astype(np.float32))[None]
    expect = vol.astype(np.float64).mean(axis=0)
    for weighting in ("gaussian", "constant"):
        got = sliding_window_inference(
            x,
            window=(8, 6),
            overlap=0.5,
            weighting=weighting,
            batch_size=5,
            predictor=depth_as_channels(lambda v: v.mean(dim=2)),
        )
        assert got.shape == (1, 1, 21, 17)
        np.testing.assert_allclose(got[0, 0].numpy(), expect, rtol=1e-6)
    probs = predict_volume(
        _LogitOfMean(), vol, window=(8, 6), overlap=0.25, weighting="gaussian", batch_size=4, device="cpu", amp=False
    )
    np.testing.assert_allclose(probs, expect / 255.0, atol=1e-5)


def test_refresh_batch_norm_recomputes_running_stats(prepared: Path) -> None:
    """After the refresh, the first BN's running mean is the average of its batch means."""
    from vesselseg.families.ipn import VolumeBlocks, load_volume_items, refresh_batch_norm
    from vesselseg.losses import build_loss
    from vesselseg.models.ipn import IPN
    from vesselseg.prepared import PreparedDataset
    from vesselseg.training.distributed import World
    from vesselseg.training.loop import Trainer

    items = load_volume_items(PreparedDataset(prepared), "train")
    blocks = VolumeBlocks(items, block=12, batch_size=4, flip=True, rotate90=True, seed=0, blocks_per_volume=4)
    assert blocks.n_blocks % 4 == 0  # equal batches: the cumulative average weighs them equally
    torch.manual_seed(0)
    net = IPN(channels=4, n_blocks=2, depth=4)
    bn = net.blocks[0][1]
    bn.running_mean.fill_(5.0)
    trainer = Trainer(
        model=net,
        model_config={"name": "ipn", "out_channels": 1},
        loss_fn=build_loss("bce"),
        params=TrainParams(threads=1, device="cpu"),
        seed=0,
        device=torch.device("cpu"),
        world=World(),
        steps_per_epoch=len(blocks),
    )
    conv = net.blocks[0][0]
    with torch.no_grad():
        ref = torch.stack([conv(x).mean(dim=(0, 2, 3, 4)) for x, _, _ in blocks.epoch(3)]).mean(dim=0)
    refresh_batch_norm(trainer, blocks, 3)
    torch.testing.assert_close(bn.running_mean, ref, atol=1e-5, rtol=1e-5)
    assert bn.momentum == 0.1 and net.training
