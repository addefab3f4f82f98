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
from typing import Any

import numpy as np
from tqdm import tqdm

from vesselseg import atomic, imagefiles
from vesselseg.data.sample import RawSample
from vesselseg.errors import DataError
from vesselseg.params import DataParams, PrepareParams
from vesselseg.prepared import SPLITS, write_item
from vesselseg.preprocess.spec import image_spec, preprocess_image, resize_image, resize_mask

log = logging.getLogger(__name__)

# {id: [H, W]} of the raw images that prepare resized (prepare.scale / fov_diameter)
NATIVE_SIZES = "native_sizes.json"
# native/{labels,fov}/<id>.png: the label and FOV of each resized image at its native size
NATIVE_DIR = "native"


def native_sizes(prepared_dir: Path | str) -> dict[str, tuple[int, int]]:
    """The native (H, W) of every resized image of a prepared folder; {} when none was."""
    import json

    path = Path(prepared_dir) / NATIVE_SIZES
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: malformed JSON ({err})") from None
    return {str(k): (int(v[0]), int(v[1])) for k, v in raw.items()}


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
        n = int(round(len(keys) * frac))  # noqa: RUF046 - int() kept as a guard against numpy scalars
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

    The image is area-averaged when shrinking; label and FOV are resized by
    :func:`vesselseg.preprocess.spec.resize_mask` (kept where at least half the source
    pixels were set).  Evaluation then runs at this resolution.
    """
    return resize_image(image, scale), resize_mask(label, scale), resize_mask(fov, scale)


def prepare_image(
    sample: RawSample, prepare: PrepareParams, spec: dict[str, Any] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Load one subject; return ``(image, label, fov)`` at the prepared size and the native ``(label, fov)``.

    Projection (volumes) and reading are done here; everything that is done to the
    image itself is :func:`vesselseg.preprocess.spec.preprocess_image` with the spec
    the model file will carry, the very function ``vesselseg segment`` calls.
    ``spec`` defaults to the one of ``prepare`` for an image dataset.
    """
    from vesselseg.preprocess.equalize import to_uint8_projection
    from vesselseg.preprocess.projection import project_volume

    if spec is None:
        spec = image_spec(DataParams(dataset="drive" if sample.volume is None else "octa500"), prepare)
    if sample.volume is not None:
        slices = imagefiles.list_slices(sample.volume)
        proj = project_volume(slices, method=prepare.projection, slab=prepare.slab)
        image = to_uint8_projection(proj)
    else:
        if sample.image is None:
            raise DataError(f"sample {sample.id}: neither an image nor a volume")
        image = imagefiles.read_image(sample.image)
    shape = image.shape[:2]
    label = imagefiles.read_mask(sample.label, shape, "label")
    fov = imagefiles.read_mask(sample.fov, shape, "FOV mask") if sample.fov is not None else np.ones(shape, dtype=bool)
    if not fov.any():
        raise DataError(f"{sample.fov}: FOV mask is empty")
    try:
        prepared = preprocess_image(image, spec, fov=fov)
    except DataError as err:
        raise DataError(f"{sample.image or sample.volume}: {err}") from None
    native = (label, fov)
    if prepared.scale != 1.0:
        label = resize_mask(label, prepared.scale)
    return prepared.image, label, prepared.fov, native


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
    spec = image_spec(data, prepare)
    native: dict[str, list[int]] = {}
    with atomic.atomic_dir(out_dir) as tmp:
        for sample in tqdm(samples, desc="prepare", unit="img", disable=None):
            image, label, fov, (native_label, native_fov) = prepare_image(sample, prepare, spec)
            if image.shape[:2] != native_label.shape:
                native[sample.id] = list(native_label.shape)
                # the published protocol scores resized images at their native resolution
                # (evaluate and `vesselseg crossdataset` map predictions back): keep the
                # native label and FOV beside the prepared ones
                imagefiles.write_png(tmp / NATIVE_DIR / "labels" / f"{sample.id}.png", native_label)
                imagefiles.write_png(tmp / NATIVE_DIR / "fov" / f"{sample.id}.png", native_fov)
            write_item(tmp, sample.id, image, label, fov)
            if prepare.volumes and sample.volume is not None:
                from vesselseg.preprocess.volume import load_volume

                # (depth, width, n_bscans): depth first so windows over the en-face
                # plane see it as channels, the layout IPN prediction slides over
                volume = load_volume(
                    imagefiles.list_slices(sample.volume), depth=prepare.volume_depth, slab=prepare.slab
                )
                atomic.write_npy(tmp / "volumes" / f"{sample.id}.npy", volume)
        atomic.write_json(tmp / "split.json", {"dataset": data.dataset, **splits})
        if native:
            # only when something was resized, so unscaled prepared folders keep
            # their bytes (and DVC hashes); an id absent here is at its native size
            atomic.write_json(tmp / NATIVE_SIZES, native)
    counts = {k: len(v) for k, v in splits.items()}
    log.info("prepared %d images of '%s': %s", len(samples), data.dataset, counts)
    return counts
