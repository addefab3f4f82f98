"""Patch sampling statistics and extraction."""

from __future__ import annotations

import numpy as np
import pytest

from vesselseg.patches import crop, extract_patches, sample_corners
from vesselseg.prepared import Item


def _scene(h: int = 64, w: int = 80, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    label = np.zeros((h, w), dtype=bool)
    label[30:32, :] = True  # a thin horizontal vessel: ~3% foreground
    fov = np.zeros((h, w), dtype=bool)
    fov[4:60, 4:76] = True
    image = rng.integers(0, 255, (h, w), dtype=np.uint8)
    return image, label, fov


def test_corners_keep_patches_inside() -> None:
    _, label, fov = _scene()
    c = sample_corners(
        label, fov, n=500, size=16, sampling="uniform", foreground_fraction=0.0, rng=np.random.default_rng(1)
    )
    assert c.shape == (500, 2)
    assert c[:, 0].min() >= 0 and c[:, 0].max() <= 64 - 16
    assert c[:, 1].min() >= 0 and c[:, 1].max() <= 80 - 16


def test_foreground_sampling_raises_vessel_share() -> None:
    _, label, fov = _scene()
    rng = np.random.default_rng(2)
    size = 8
    uni = sample_corners(label, fov, n=4000, size=size, sampling="uniform", foreground_fraction=0.5, rng=rng)
    fg = sample_corners(label, fov, n=4000, size=size, sampling="foreground", foreground_fraction=0.5, rng=rng)
    centre = size // 2
    hit_uni = label[uni[:, 0] + centre, uni[:, 1] + centre].mean()
    hit_fg = label[fg[:, 0] + centre, fg[:, 1] + centre].mean()
    # uniform centres hit the vessel about as often as its share of the FOV
    share = label[fov].mean()
    assert abs(hit_uni - share) < 0.02
    # half of the foreground-sampled centres are on the vessel, plus the uniform half's share
    assert abs(hit_fg - (0.5 + 0.5 * share)) < 0.03


def test_uniform_centres_stay_in_fov() -> None:
    _, label, fov = _scene()
    size = 8
    c = sample_corners(
        label, fov, n=2000, size=size, sampling="uniform", foreground_fraction=0, rng=np.random.default_rng(3)
    )
    # centres are drawn in the FOV and only shifted when the patch would leave the image
    assert fov[c[:, 0] + size // 2, c[:, 1] + size // 2].all()


def test_crop_matches_slicing() -> None:
    image, _, _ = _scene()
    corners = np.array([[0, 0], [10, 20], [48, 64]], dtype=np.int32)
    patches = crop(image, corners, 16)
    for p, (r, c) in zip(patches, corners, strict=True):
        np.testing.assert_array_equal(p, image[r : r + 16, c : c + 16])


def test_rgb_crop() -> None:
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    p = crop(rgb, np.array([[2, 3]]), 5)
    np.testing.assert_array_equal(p[0], rgb[2:7, 3:8])


def test_extract_is_deterministic_and_per_image_independent() -> None:
    items = [Item(f"i{k}", *_scene(seed=k)) for k in range(3)]
    kw = dict(
        split="train",
        size=16,
        per_image=20,
        sampling="foreground",
        foreground_fraction=0.5,
        augment_copies=0,
        rotate_limit=0.0,
        scale_limit=0.0,
        seed=7,
    )
    a = extract_patches(items, **kw)
    b = extract_patches(items, **kw)
    np.testing.assert_array_equal(a.images, b.images)
    c = extract_patches(items[:2], **kw)  # dropping an image leaves the others' patches alone
    np.testing.assert_array_equal(a.images[:40], c.images)
    assert a.images.shape == (60, 16, 16) and a.labels.dtype == np.uint8
    assert list(a.manifest.columns) == ["split", "image_id", "row", "col", "copy"]


def test_offline_augmentation_keeps_image_and_mask_aligned() -> None:
    image, label, fov = _scene()
    image = np.where(label, 255, 0).astype(np.uint8)  # the image *is* the label
    items = [Item("a", image, label, fov)]
    ps = extract_patches(
        items,
        split="train",
        size=24,
        per_image=30,
        sampling="foreground",
        foreground_fraction=1.0,
        augment_copies=2,
        rotate_limit=45.0,
        scale_limit=0.05,
        seed=0,
    )
    assert len(ps.images) == 90
    aug = ps.images[30:] > 127
    lab = ps.labels[30:].astype(bool)
    # nearest-neighbour masks vs linear image interpolation: agree except on edges
    assert (aug == lab).mean() > 0.95


def test_patch_larger_than_image_is_refused() -> None:
    image, label, fov = _scene(h=20, w=20)
    from vesselseg.errors import DataError

    with pytest.raises(DataError, match="patches.size=48"):
        extract_patches(
            [Item("small", image, label, fov)],
            split="train",
            size=48,
            per_image=5,
            sampling="uniform",
            foreground_fraction=0,
            augment_copies=0,
            rotate_limit=0,
            scale_limit=0,
            seed=0,
        )


def test_image_weighting_by_foreground_share() -> None:
    a = _scene(seed=0)
    b_img, b_lab, b_fov = _scene(seed=1)
    b_lab = b_lab.copy()
    b_lab[10:20, :] = True  # image b has far more vessel than image a
    items = [Item("a", *a), Item("b", b_img, b_lab, b_fov)]
    ps = extract_patches(
        items,
        split="train",
        size=16,
        per_image=50,
        sampling="uniform",
        foreground_fraction=0,
        augment_copies=0,
        rotate_limit=0,
        scale_limit=0,
        seed=0,
        image_weighting="foreground",
    )
    counts = ps.manifest["image_id"].value_counts()
    assert counts.sum() == 100 and counts["b"] > 2 * counts["a"] >= 2
