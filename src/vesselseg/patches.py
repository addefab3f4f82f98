"""Patch extraction with foreground-aware sampling.

Thin vessels are a few percent of the pixels: uniform crops show the network mostly
background.  ``foreground`` sampling centres a fraction of the patches on vessel
pixels (as nnU-Net oversamples foreground), the rest anywhere inside the field of
view.  Patches are stored as a few ``.npy`` arrays plus a manifest, never as one
file per patch, so loading a training set is one ``np.load`` per array.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from tqdm import tqdm

from vesselseg import atomic
from vesselseg.augment import offline_augmenter
from vesselseg.errors import DataError
from vesselseg.prepared import Item, PreparedDataset

log = logging.getLogger(__name__)

Sampling = Literal["uniform", "foreground"]


def sample_corners(
    label: np.ndarray,
    fov: np.ndarray,
    *,
    n: int,
    size: int,
    sampling: Sampling,
    foreground_fraction: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Top-left corners ``(n, 2)`` (row, col) of patches lying fully inside the image.

    A patch is *centred* on a drawn pixel and then shifted to fit the image; centres
    are drawn inside the FOV (uniform part) or on vessel pixels inside the FOV
    (foreground part).  Coordinates of candidates are computed once per image.
    """
    h, w = label.shape
    if size > h or size > w:
        raise ValueError(f"patches.size={size} is larger than the image ({w}x{h})")
    inside = fov if fov.any() else np.ones_like(fov)
    cand_all = np.flatnonzero(inside)
    n_fg = 0
    if sampling == "foreground":
        cand_fg = np.flatnonzero(label & inside)
        n_fg = int(round(n * foreground_fraction)) if cand_fg.size else 0  # noqa: RUF046 - int() kept as a guard against numpy scalars
    picks = [rng.choice(cand_all, size=n - n_fg, replace=True)]
    if n_fg:
        picks.append(rng.choice(cand_fg, size=n_fg, replace=True))
    flat = np.concatenate(picks)
    rows, cols = np.divmod(flat, w)
    half = size // 2
    top = np.clip(rows - half, 0, h - size)
    left = np.clip(cols - half, 0, w - size)
    return np.stack([top, left], axis=1).astype(np.int32)


def crop(arr: np.ndarray, corners: np.ndarray, size: int) -> np.ndarray:
    """Gather patches ``(n, size, size[, C])`` with one fancy-indexing call."""
    offs = np.arange(size)
    rr = corners[:, 0, None, None] + offs[None, :, None]
    cc = corners[:, 1, None, None] + offs[None, None, :]
    return arr[rr, cc]


@dataclass
class PatchSet:
    images: np.ndarray  # uint8 (N, s, s) or (N, s, s, C)
    labels: np.ndarray  # uint8 {0, 1} (N, s, s)
    fov: np.ndarray  # uint8 {0, 1} (N, s, s)
    manifest: pd.DataFrame


def extract_patches(
    items: list[Item],
    *,
    split: str,
    size: int,
    per_image: int,
    sampling: Sampling,
    foreground_fraction: float,
    augment_copies: int,
    rotate_limit: float,
    scale_limit: float,
    seed: int,
    image_weighting: str = "uniform",
) -> PatchSet:
    """Sample, crop and (optionally) augment offline the patches of one split.

    ``image_weighting="foreground"`` spreads the same total (``per_image`` x images)
    in proportion to each image's vessel share inside its FOV, so images with more
    vessel are seen more often (the unet5-onecycle recipe); every image keeps >= 1.

    Each image gets its own generator seeded by ``(seed, split, image index)`` so
    adding an image never changes the patches of the others.
    """
    split_code = {"train": 0, "val": 1, "test": 2}[split]
    imgs, labs, fovs, rows = [], [], [], []
    augment = (
        offline_augmenter(rotate_limit=rotate_limit, scale_limit=scale_limit, seed=seed) if augment_copies else None
    )
    counts = [per_image] * len(items)
    if image_weighting == "foreground" and items:
        share = np.array([it.label[it.fov].mean() if it.fov.any() else it.label.mean() for it in items]) + 1e-6
        counts = np.maximum(1, np.round(per_image * len(items) * share / share.sum())).astype(int).tolist()
    for idx, item in enumerate(tqdm(items, desc=f"patches {split}", unit="img", disable=None)):
        h, w = item.label.shape
        if size > h or size > w:
            raise DataError(f"{item.id}: image {w}x{h} is smaller than patches.size={size}")
        rng = np.random.default_rng([seed, split_code, idx])
        corners = sample_corners(
            item.label,
            item.fov,
            n=counts[idx],
            size=size,
            sampling=sampling,
            foreground_fraction=foreground_fraction,
            rng=rng,
        )
        im = crop(item.image, corners, size)
        lb = crop(item.label, corners, size).astype(np.uint8)
        fv = crop(item.fov, corners, size).astype(np.uint8)
        imgs.append(im)
        labs.append(lb)
        fovs.append(fv)
        rows.append(pd.DataFrame({"image_id": item.id, "row": corners[:, 0], "col": corners[:, 1], "copy": 0}))
        for copy in range(1, augment_copies + 1):
            out = [augment(image=a, mask=b, fov=c) for a, b, c in zip(im, lb, fv, strict=True)]  # type: ignore[misc]
            imgs.append(np.stack([o["image"] for o in out]))
            labs.append(np.stack([o["mask"] for o in out]))
            fovs.append(np.stack([o["fov"] for o in out]))
            rows.append(pd.DataFrame({"image_id": item.id, "row": corners[:, 0], "col": corners[:, 1], "copy": copy}))
    if not imgs:
        raise DataError(f"split '{split}' has no images: nothing to extract patches from")
    manifest = pd.concat(rows, ignore_index=True)
    manifest.insert(0, "split", split)
    return PatchSet(np.concatenate(imgs), np.concatenate(labs), np.concatenate(fovs), manifest)


def _check_sizes(ds: PreparedDataset, size: int) -> None:
    """Refuse an image smaller than a patch before any work, naming the file.

    Reads only headers (PIL), so a bad size among many images fails in a second
    instead of after the other images were loaded.
    """
    from vesselseg.imagefiles import image_size

    for split in ("train", "val"):
        for id_ in ds.ids(split):
            path = ds.paths(id_)[0]
            if not path.is_file():
                raise DataError(f"{path}: file not found; run the prepare stage again")
            h, w = image_size(path)
            if size > h or size > w:
                raise DataError(
                    f"{path}: image {w}x{h} is smaller than patches.size={size}; lower patches.size to at most {min(h, w)}"
                )


def run_patches(
    *,
    prepared_dir: Path,
    out_dir: Path,
    size: int,
    per_image: int,
    val_per_image: int,
    sampling: Sampling,
    foreground_fraction: float,
    augment_copies: int,
    rotate_limit: float,
    scale_limit: float,
    seed: int,
    image_weighting: str = "uniform",
) -> dict[str, float]:
    """Write ``{train,val}_{images,labels,fov}.npy``, ``manifest.csv`` and ``stats.json``."""
    ds = PreparedDataset(prepared_dir)
    _check_sizes(ds, size)
    stats: dict[str, float] = {}
    with atomic.atomic_dir(out_dir) as tmp:
        for split, count, copies, weighting in (
            ("train", per_image, augment_copies, image_weighting),
            ("val", val_per_image, 0, "uniform"),
        ):
            ids = ds.ids(split)
            if not ids:
                raise DataError(f"{prepared_dir}/split.json: split '{split}' is empty")
            items = [ds.load(i) for i in ids]
            ps = extract_patches(
                items,
                split=split,
                size=size,
                per_image=count,
                sampling=sampling,
                foreground_fraction=foreground_fraction,
                augment_copies=copies,
                rotate_limit=rotate_limit,
                scale_limit=scale_limit,
                seed=seed,
                image_weighting=weighting,
            )
            atomic.write_npy(tmp / f"{split}_images.npy", ps.images)
            atomic.write_npy(tmp / f"{split}_labels.npy", ps.labels)
            atomic.write_npy(tmp / f"{split}_fov.npy", ps.fov)
            ps.manifest.to_csv(tmp / f"{split}_manifest.csv", index=False)
            stats[f"{split}_patches"] = len(ps.images)
            stats[f"{split}_foreground"] = round(float(ps.labels.mean()), 6)
            image_fg = float(np.mean([it.label[it.fov].mean() if it.fov.any() else it.label.mean() for it in items]))
            stats[f"{split}_image_foreground"] = round(image_fg, 6)
        atomic.write_json(tmp / "stats.json", stats)
    log.info("patches: %s", stats)
    return stats


def load_patches(patch_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Memory-map the arrays of one split (cheap to open, pages load on use)."""
    out = []
    for kind in ("images", "labels", "fov"):
        path = Path(patch_dir) / f"{split}_{kind}.npy"
        if not path.is_file():
            raise DataError(f"{path}: not found; run the patches stage first")
        out.append(np.load(path, mmap_mode="r"))
    if not (len(out[0]) == len(out[1]) == len(out[2])):
        raise DataError(f"{patch_dir}: {split} arrays have different lengths")
    return out[0], out[1], out[2]
