"""Train/val/test assignment: official splits kept, seeded draws, groups together."""

from __future__ import annotations

from pathlib import Path

from vesselseg.data.sample import RawSample
from vesselseg.prepare import assign_splits


def _s(i: str, split=None, group=None) -> RawSample:
    return RawSample(id=i, label=Path(f"{i}.png"), image=Path(f"{i}.png"), split=split, group=group)


def test_free_samples_are_split_by_fraction_and_seed() -> None:
    samples = [_s(f"s{k:02d}") for k in range(20)]
    a = assign_splits(samples, val_fraction=0.15, test_fraction=0.25, seed=1)
    b = assign_splits(samples, val_fraction=0.15, test_fraction=0.25, seed=1)
    assert a == b
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (12, 3, 5)
    assert sorted(a["train"] + a["val"] + a["test"]) == sorted(s.id for s in samples)
    c = assign_splits(samples, val_fraction=0.15, test_fraction=0.25, seed=2)
    assert c != a


def test_official_test_kept_and_val_held_out_of_train() -> None:
    samples = [_s(f"tr{k}", "train") for k in range(20)] + [_s(f"te{k}", "test") for k in range(20)]
    out = assign_splits(samples, val_fraction=0.15, test_fraction=0.3, seed=0)
    assert sorted(out["test"]) == sorted(f"te{k}" for k in range(20))
    assert len(out["val"]) == 3 and len(out["train"]) == 17
    assert all(i.startswith("tr") for i in out["val"] + out["train"])


def test_official_val_is_respected() -> None:
    samples = [_s("a", "train"), _s("b", "train"), _s("c", "val"), _s("d", "test")]
    out = assign_splits(samples, val_fraction=0.5, test_fraction=0.0, seed=0)
    assert out == {"train": ["a", "b"], "val": ["c"], "test": ["d"]}


def test_groups_never_straddle_splits() -> None:
    samples = [_s(f"p{p}_{k}", group=f"p{p}") for p in range(10) for k in range(5)]
    out = assign_splits(samples, val_fraction=0.2, test_fraction=0.2, seed=3)
    where = {}
    for split, ids in out.items():
        for i in ids:
            where.setdefault(i.split("_")[0], set()).add(split)
    assert all(len(v) == 1 for v in where.values())


def test_rescale_halves_image_label_and_fov_together() -> None:
    import numpy as np

    from vesselseg.prepare import rescale

    image = np.arange(64 * 48, dtype=np.uint32).reshape(64, 48).astype(np.uint8)
    label = np.zeros((64, 48), dtype=bool)
    label[10:14, :] = True  # a 4-px vessel becomes 2 px at half resolution
    fov = np.ones((64, 48), dtype=bool)
    im, lb, fv = rescale(image, label, fov, 0.5)
    assert im.shape == lb.shape == fv.shape == (32, 24)
    assert lb.dtype == bool and lb[5:7].all() and lb.sum() == 2 * 24
    assert fv.all()
