"""Synthetic generators: determinism, layouts, shapes, vessel fractions, FOV, widths."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage.morphology import skeletonize

from vesselseg import imagefiles
from vesselseg.data.synthetic_fundus import drive_ids, generate_fundus_dataset, synthesize_fundus
from vesselseg.data.synthetic_octa import generate_octa_dataset, synthesize_subject
from vesselseg.data.vessel_tree import Origin, border_origins, disc_origins, draw_vessel_tree
from vesselseg.errors import ParamsError
from vesselseg.preprocess.projection import project_volume

OCTA = {"n_subjects": 3, "n_bscans": 64, "depth": 48, "width": 64, "slab": (16, 32)}


def files_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def dice(pred: np.ndarray, label: np.ndarray) -> float:
    return 2.0 * float((pred & label).sum()) / float(pred.sum() + label.sum())


def best_threshold_dice(score: np.ndarray, label: np.ndarray) -> float:
    return max(dice(score > t, label) for t in np.quantile(score, np.linspace(0.5, 0.99, 60)))


def local_widths(label: np.ndarray) -> np.ndarray:
    """Vessel width at each centre-line pixel: twice the distance to the background."""
    dist = cv2.distanceTransform(np.pad(label, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
    return 2.0 * dist[skeletonize(label)]


# --- vessel tree ---------------------------------------------------------------------


def test_tree_is_deterministic_and_seed_dependent() -> None:
    def draw(seed: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        t = draw_vessel_tree((96, 96), rng, origins=border_origins((96, 96), 3, rng), width_range=(1.0, 5.0))
        return t.intensity, t.label

    a, b, c = draw(7), draw(7), draw(8)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_tree_maps_are_consistent() -> None:
    rng = np.random.default_rng(0)
    t = draw_vessel_tree((128, 128), rng, origins=border_origins((128, 128), 4, rng), width_range=(1.0, 6.0))
    assert (
        t.intensity.dtype == np.float32 and t.label.dtype == bool and t.intensity.shape == t.label.shape == (128, 128)
    )
    assert t.intensity.min() >= 0.0 and t.intensity.max() <= 1.0 and t.intensity.max() > 0.9
    assert np.all(t.intensity[t.label] > 0)  # labelled pixels are drawn
    assert t.intensity[~t.label].mean() < 0.05  # and the rest mostly is not
    assert 0.03 < t.vessel_fraction < 0.3 and t.n_segments > 20


def test_tree_widths_follow_the_range() -> None:
    rng = np.random.default_rng(4)
    size = 200
    c = size / 2
    t = draw_vessel_tree(
        (size, size),
        rng,
        origins=disc_origins((c, c), 5.0, [0.0, math.pi / 2, math.pi, -math.pi / 2], rng),
        width_range=(1.0, 8.0),
    )
    w = local_widths(t.label)
    assert w.max() <= 8.0 + 2.0  # trunks: at most the top of the range (plus a pixel of rasterization each side)
    assert np.percentile(w, 95) >= 5.0  # thick vessels exist
    assert np.percentile(w, 10) <= 2.5  # and thin ones
    narrow = draw_vessel_tree(
        (size, size), np.random.default_rng(4), origins=[Origin(c, 0.0, 0.0)], width_range=(1.0, 3.0)
    )
    assert local_widths(narrow.label).max() <= 3.0 + 2.0


def test_tree_avoid_zone_and_bad_params() -> None:
    rng = np.random.default_rng(5)
    t = draw_vessel_tree(
        (128, 128), rng, origins=border_origins((128, 128), 6, rng), width_range=(1.0, 4.0), avoid=(64.0, 64.0, 20.0)
    )
    yy, xx = np.mgrid[0:128, 0:128]
    inner = (yy - 64) ** 2 + (xx - 64) ** 2 < 12**2  # well inside the zone (branches stop on entry)
    assert not t.label[inner].any()
    with pytest.raises(ParamsError, match="width_range"):
        draw_vessel_tree((32, 32), rng, origins=[Origin(0, 0, 0)], width_range=(3.0, 1.0))


# --- OCTA ----------------------------------------------------------------------------------


def test_octa_dataset_is_deterministic(tmp_path: Path) -> None:
    ids = generate_octa_dataset(tmp_path / "a", seed=3, **OCTA)  # type: ignore[arg-type]
    generate_octa_dataset(tmp_path / "b", seed=3, **OCTA)  # type: ignore[arg-type]
    generate_octa_dataset(tmp_path / "c", seed=4, **OCTA)  # type: ignore[arg-type]
    a, b, c = (files_bytes(tmp_path / x) for x in "abc")
    assert a == b
    assert a.keys() == c.keys() and a != c
    assert len(ids) == 3 and len(set(ids)) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_octa_layout_shapes_and_label(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    ids = generate_octa_dataset(root, seed=0, **OCTA)  # type: ignore[arg-type]
    assert sorted(p.name for p in (root / "OCTA").iterdir()) == sorted(ids)
    for sid in ids:
        slices = imagefiles.list_slices(root / "OCTA" / sid)
        assert [p.name for p in slices] == [f"{k}.bmp" for k in range(1, OCTA["n_bscans"] + 1)]  # type: ignore[operator]
        bscan = imagefiles.read_image(slices[0])
        assert bscan.shape == (OCTA["depth"], OCTA["width"]) and bscan.dtype == np.uint8
        gt = imagefiles.read_image(root / "GT" / f"{sid}.bmp")
        assert gt.shape == (OCTA["width"], OCTA["n_bscans"])
        assert set(np.unique(gt).tolist()) == {0, 255}
        assert 0.05 <= (gt > 0).mean() <= 0.25


def test_octa_vessels_live_in_the_slab(tmp_path: Path) -> None:
    """The slab projection shows the labelled tree clearly; the full depth does not."""
    root = tmp_path / "raw"
    ids = generate_octa_dataset(root, seed=1, **OCTA)  # type: ignore[arg-type]
    slab_scores, full_scores = [], []
    for sid in ids:
        slices = imagefiles.list_slices(root / "OCTA" / sid)
        label = imagefiles.read_mask(root / "GT" / f"{sid}.bmp")
        slab = project_volume(slices, method="mean", slab=OCTA["slab"])  # type: ignore[arg-type]
        full = project_volume(slices, method="mean")
        assert slab.shape == label.shape
        slab_scores.append(best_threshold_dice(slab, label))
        full_scores.append(best_threshold_dice(full, label))
        # Orientation: the label lines up with the projection, not with its transpose.
        assert np.corrcoef(slab.ravel(), label.ravel())[0, 1] > 0.6
        assert np.corrcoef(slab.T.ravel(), label.ravel())[0, 1] < 0.3
    assert np.mean(slab_scores) > 0.85
    assert np.mean(full_scores) < np.mean(slab_scores) - 0.08


def test_octa_vessel_fraction_over_seeds() -> None:
    fractions = [
        synthesize_subject(np.random.default_rng(s), n_bscans=96, depth=40, width=96, slab=(10, 26))[1].mean()
        for s in range(6)
    ]
    assert all(0.05 <= f <= 0.25 for f in fractions), fractions


def test_octa_bad_params(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"data\.synthetic\.slab"):
        generate_octa_dataset(tmp_path / "x", n_subjects=1, n_bscans=16, depth=16, width=16, slab=(10, 20), seed=0)
    assert not (tmp_path / "x").exists()


# --- fundus ----------------------------------------------------------------------------------


def test_drive_ids() -> None:
    assert drive_ids(40) == ([f"{i:02d}" for i in range(1, 21)], [f"{i:02d}" for i in range(21, 41)])
    assert drive_ids(5) == (["01", "02"], ["03", "04", "05"])
    assert drive_ids(120)[0][0] == "001"


def test_fundus_layout_and_determinism(tmp_path: Path) -> None:
    generate_fundus_dataset(tmp_path / "a", n_images=4, size=96, seed=2)
    generate_fundus_dataset(tmp_path / "b", n_images=4, size=96, seed=2)
    generate_fundus_dataset(tmp_path / "c", n_images=4, size=96, seed=3)
    a, b, c = (files_bytes(tmp_path / x) for x in "abc")
    assert a == b and a != c
    assert sorted(a) == sorted(
        [
            "test/images/01_test.tif",
            "test/images/02_test.tif",
            "test/1st_manual/01_manual1.gif",
            "test/1st_manual/02_manual1.gif",
            "test/mask/01_test_mask.gif",
            "test/mask/02_test_mask.gif",
            "training/images/03_training.tif",
            "training/images/04_training.tif",
            "training/1st_manual/03_manual1.gif",
            "training/1st_manual/04_manual1.gif",
            "training/mask/03_training_mask.gif",
            "training/mask/04_training_mask.gif",
        ]
    )
    root = tmp_path / "a" / "training"
    img = imagefiles.read_image(root / "images" / "03_training.tif")
    assert img.shape == (96, 96, 3) and img.dtype == np.uint8
    label = imagefiles.read_mask(root / "1st_manual" / "03_manual1.gif", img.shape[:2])
    fov = imagefiles.read_mask(root / "mask" / "03_training_mask.gif", img.shape[:2], "FOV mask")
    assert label.any() and fov.any() and not (label & ~fov).any()


def test_fundus_fov_is_a_centred_circle() -> None:
    size = 128
    f = synthesize_fundus(np.random.default_rng(0), size=size, fov_fraction=0.46)
    yy, xx = np.mgrid[0:size, 0:size]
    c = (size - 1) / 2
    r = np.hypot(yy - c, xx - c)
    assert f.fov[r < 0.46 * size - 1].all() and not f.fov[r > 0.46 * size + 1].any()
    assert f.fov.mean() == pytest.approx(math.pi * 0.46**2, rel=0.03)
    assert not f.rgb[~f.fov].any()  # black outside the FOV


def test_fundus_looks_like_a_fundus() -> None:
    fractions = []
    for seed in range(4):
        f = synthesize_fundus(np.random.default_rng(seed), size=160)
        inside_vessel, inside_bg = f.label & f.fov, ~f.label & f.fov
        fractions.append(inside_vessel.sum() / f.fov.sum())
        mean_v = f.rgb[inside_vessel].mean(axis=0)
        mean_b = f.rgb[inside_bg].mean(axis=0)
        assert mean_b[0] > mean_b[1] > mean_b[2]  # orange-red background
        contrast = (mean_b - mean_v) / mean_b
        assert (contrast > 0).all()  # vessels darker in every channel
        assert contrast[1] > contrast[0] and contrast[1] > 0.2  # and most visible in green
    assert all(0.05 <= fr <= 0.25 for fr in fractions), fractions


def test_fundus_widths_and_illumination() -> None:
    f = synthesize_fundus(np.random.default_rng(1), size=256, width_range=(1.0, 8.0))
    w = local_widths(f.label)
    assert w.max() <= 10.0 and np.percentile(w, 10) <= 2.5 and np.percentile(w, 99) >= 5.0
    # Vignetting: the FOV rim is darker than the centre region (away from the vessels).
    yy, xx = np.mgrid[0:256, 0:256]
    r = np.hypot(yy - 127.5, xx - 127.5) / (0.46 * 256)
    red = f.rgb[:, :, 0].astype(float)
    bg = ~f.label & f.fov
    assert red[bg & (r > 0.85)].mean() < 0.8 * red[bg & (r < 0.4)].mean()
