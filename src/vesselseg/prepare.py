"""Raw dataset -> the common prepared layout (projection, channel, equalization, split).

Every dataset adapter lists its subjects as :class:`RawSample` records; this module
is the only place that turns them into model-ready 2D images, so the rest of the
pipeline never knows which dataset it runs on.  The whole output folder is built
under a temporary name and swapped in, so a failure at image 37 of 40 leaves the
previous prepared data (or none), never a mix.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vesselseg import atomic, imagefiles
from vesselseg.data.sample import RawSample
from vesselseg.errors import DataError
from vesselseg.prepared import SPLITS, write_item
from vesselseg.params import DataParams, PrepareParams

log = logging.getLogger(__name__)


def _draw(
    items: list[RawSample], fractions: dict[str, float], rest: str, rng: np.random.Generator
) -> dict[str, list[str]]:
    """Seeded draw over groups (a patient's slices stay together)."""
    groups: OrderedDict[str, list[str]] = OrderedDict()
    for s in sorted(items, key=lambda s: s.id):
        groups.setdefault(s.group or s.id, []).append(s.id)
    keys = list(groups)
    order = rng.permutation(len(keys))
    out: dict[str, list[str]] = {rest: []}
    start = 0
    for split, frac in fractions.items():
        n = int(round(len(keys) * frac))
        if frac > 0 and n == 0 and len(keys) - start > 1:
            n = 1  # a requested split is never silently empty
        out[split] = [i for k in order[start : start + n] for i in groups[keys[k]]]
        start += n
    out[rest] = [i for k in order[start:] for i in groups[keys[k]]]
    return out


def assign_splits(
    samples: list[RawSample], *, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[str]]:
    """Official splits where the dataset has them; a seeded draw for the rest.

    Samples marked ``train`` without an official validation split give up
    ``val_fraction`` of their groups to validation, as the DRIVE protocol holds out a
    few training images; the official test split is never touched.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, list[str]] = {s: [x.id for x in samples if x.split == s] for s in SPLITS}
    free = [x for x in samples if x.split is None]
    if free:
        drawn = _draw(free, {"val": val_fraction, "test": test_fraction}, "train", rng)
        for split, ids in drawn.items():
            out[split].extend(ids)
    if out["train"] and not any(x.split == "val" for x in samples) and not free:
        official_train = [x for x in samples if x.split == "train"]
        drawn = _draw(official_train, {"val": val_fraction}, "train", rng)
        out["train"], out["val"] = drawn["train"], drawn["val"]
    return {split: sorted(ids) for split, ids in out.items()}


def rescale(image: np.ndarray, label: np.ndarray, fov: np.ndarray, scale: float) -> tuple[np.ndarray, ...]:
    """Resize image, label and FOV together (``prepare.scale``; HRF at half resolution is 0.5).

    The image is area-averaged; label and FOV are area-averaged too and kept where
    at least half the source pixels were set, which keeps thin vessels connected
    better than nearest-neighbour sampling.  Evaluation then runs at this resolution.
    """
    import cv2

    h, w = label.shape
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    image = cv2.resize(image, size, interpolation=interp)
    label = cv2.resize(label.astype(np.float32), size, interpolation=interp) >= 0.5
    fov = cv2.resize(fov.astype(np.float32), size, interpolation=interp) >= 0.5
    return image, label, fov


def prepare_image(sample: RawSample, prepare: PrepareParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Load one subject and apply projection, channel choice and equalization."""
    from vesselseg.preprocess.equalize import equalize, select_channel, to_uint8_projection
    from vesselseg.preprocess.projection import project_volume

    if sample.volume is not None:
        slices = imagefiles.list_slices(sample.volume)
        proj = project_volume(slices, method=prepare.projection, slab=prepare.slab)
        image = to_uint8_projection(proj)
    else:
        assert sample.image is not None
        image = select_channel(imagefiles.read_image(sample.image), prepare.channel)
    shape = image.shape[:2]
    label = imagefiles.read_mask(sample.label, shape, "label")
    fov = imagefiles.read_mask(sample.fov, shape, "FOV mask") if sample.fov is not None else np.ones(shape, dtype=bool)
    if not fov.any():
        raise DataError(f"{sample.fov}: FOV mask is empty")
    if prepare.scale != 1.0:
        image, label, fov = rescale(image, label, fov, prepare.scale)
    image = equalize(
        image, method=prepare.equalize, clahe_clip=prepare.clahe_clip, clahe_tile=prepare.clahe_tile,
        gamma=prepare.gamma, mask=fov,
    )
    if image.ndim == 3:
        image = image * fov[..., None].astype(np.uint8)
    else:
        image = np.where(fov, image, 0).astype(np.uint8)
    return image, label, fov


def run_prepare(*, raw_dir: Path, out_dir: Path, data: DataParams, prepare: PrepareParams) -> dict[str, int]:
    from vesselseg.data.adapters import get_adapter

    adapter = get_adapter(data.dataset)
    samples = adapter.samples(Path(raw_dir), data)
    if not samples:
        raise DataError(f"{raw_dir}: dataset '{data.dataset}' has no samples (empty dataset)")
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise DataError(f"{raw_dir}: duplicate sample ids {dup}")
    splits = assign_splits(samples, val_fraction=data.val_fraction, test_fraction=data.test_fraction, seed=data.seed)
    if not splits["train"]:
        raise DataError(f"{raw_dir}: no training images left after the split (lower data.val_fraction/test_fraction)")
    with atomic.atomic_dir(out_dir) as tmp:
        for sample in tqdm(samples, desc="prepare", unit="img", disable=None):
            image, label, fov = prepare_image(sample, prepare)
            write_item(tmp, sample.id, image, label, fov)
            if prepare.volumes and sample.volume is not None:
                from vesselseg.preprocess.volume import load_volume

                # (depth, width, n_bscans): depth first so windows over the en-face
                # plane see it as channels, the layout IPN prediction slides over
                volume = load_volume(imagefiles.list_slices(sample.volume), depth=prepare.volume_depth, slab=prepare.slab)
                atomic.write_npy(tmp / "volumes" / f"{sample.id}.npy", volume)
        atomic.write_json(tmp / "split.json", {"dataset": data.dataset, **splits})
    counts = {k: len(v) for k, v in splits.items()}
    log.info("prepared %d images of '%s': %s", len(samples), data.dataset, counts)
    return counts
