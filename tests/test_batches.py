"""Training batches: the fast stacked augmentation equals the per-target call; epoch order."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from vesselseg.augment import online_augmenter
from vesselseg.training.batches import augment_batch, epoch_order


@pytest.mark.parametrize("rgb", [False, True])
def test_stacked_augmentation_equals_per_sample_call(rgb: bool) -> None:
    rng = np.random.default_rng(0)
    shape = (16, 12, 12, 3) if rgb else (16, 12, 12)
    im = rng.integers(0, 255, shape, dtype=np.uint8)
    lb = rng.integers(0, 2, (16, 12, 12), dtype=np.uint8)
    fv = rng.integers(0, 2, (16, 12, 12), dtype=np.uint8)
    fast = augment_batch(online_augmenter(flip=True, rotate90=True, seed=5), im, lb, fv)
    ref_aug = online_augmenter(flip=True, rotate90=True, seed=5)
    ref = [ref_aug(image=a, mask=b, fov=c) for a, b, c in zip(im, lb, fv, strict=True)]
    np.testing.assert_array_equal(fast[0], np.stack([r["image"] for r in ref]))
    np.testing.assert_array_equal(fast[1], np.stack([r["mask"] for r in ref]))
    np.testing.assert_array_equal(fast[2], np.stack([r["fov"] for r in ref]))
    assert not np.array_equal(fast[0], im)  # something was actually transformed


def test_epoch_order_is_a_function_of_seed_and_epoch_and_ranks_partition_it() -> None:
    a = epoch_order(10, seed=1, epoch=3)
    assert np.array_equal(a, epoch_order(10, seed=1, epoch=3))
    assert not np.array_equal(a, epoch_order(10, seed=1, epoch=4))
    r0, r1 = epoch_order(10, seed=1, epoch=3, rank=0, world=2), epoch_order(10, seed=1, epoch=3, rank=1, world=2)
    assert sorted(np.concatenate([r0, r1]).tolist()) == list(range(10))
    assert np.array_equal(r0, a[0::2]) and np.array_equal(r1, a[1::2])


def test_projection_restores_opencv_threads(tmp_path) -> None:
    from vesselseg.preprocess.projection import project_volume

    for k in range(1, 4):
        cv2.imwrite(str(tmp_path / f"{k}.bmp"), np.full((6, 5), k * 10, np.uint8))
    before = cv2.getNumThreads()
    project_volume(sorted(tmp_path.glob("*.bmp")), method="mean")
    assert cv2.getNumThreads() == before
