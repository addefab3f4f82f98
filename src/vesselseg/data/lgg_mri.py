"""Kaggle "LGG MRI segmentation" (Buda et al. 2019, ``kaggle_3m``): FLAIR lesion masks."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from vesselseg import imagefiles
from vesselseg.data.adapters import (
    building,
    find_dir,
    listing_error,
    require_raw,
    split_source,
    unpacked_source,
)
from vesselseg.data.ingest import Source, Subject, ingest
from vesselseg.data.sample import RawSample
from vesselseg.errors import DataError
from vesselseg.params import DataParams

log = logging.getLogger(__name__)

_LGG_SLICE = re.compile(r"^(?P<patient>.+)_(?P<n>\d+)(?P<mask>_mask)?$")


def _is_lgg_root(d: Path) -> bool:
    return any(c.is_dir() and any(c.glob("*_mask.tif")) for c in d.iterdir())


def _lgg_pairs(root: Path) -> tuple[list[tuple[str, str, Path, Path]], list[str]]:
    """(patient, id, image, mask) for each slice, and the files that lack a partner."""
    pairs: list[tuple[str, str, Path, Path]] = []
    unpaired: list[str] = []
    for patient in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        images: dict[str, Path] = {}
        masks: dict[str, Path] = {}
        for f in patient.glob("*.tif"):
            m = _LGG_SLICE.match(f.stem)
            if m is None:
                continue
            (masks if m["mask"] else images)[f"{m['patient']}_{m['n']}"] = f
        unpaired += [str(p.relative_to(root)) for k, p in images.items() if k not in masks]
        unpaired += [str(p.relative_to(root)) for k, p in masks.items() if k not in images]
        for k in sorted(images.keys() & masks.keys(), key=lambda s: imagefiles.natural_key(s)):
            pairs.append((patient.name, k, images[k], masks[k]))
    return pairs, sorted(unpaired)


class LggMriAdapter:
    """Kaggle "LGG MRI segmentation" (``kaggle_3m``): FLAIR lesion masks, 3-channel slices.

    ``group`` is the patient, so the prepare stage splits by patient and no patient's
    slices leak between train and test.  Slices without lesion are kept: the model
    must learn to predict empty masks too.
    """

    name = "lgg_mri"
    layout = (
        "the kaggle_3m folder (or the Kaggle zip): one folder per patient with <patient>_N.tif and <patient>_N_mask.tif"
    )

    def materialize(self, raw_dir: Path, *, source: Path | None, params: DataParams) -> None:
        paths = split_source(source, self.name, self.layout)
        with unpacked_source(paths, Path(raw_dir)) as unpacked, building(raw_dir, self.name) as tmp:
            root = find_dir(unpacked.bases, _is_lgg_root, "patient folders with *_mask.tif (kaggle_3m)")
            pairs, unpaired = _lgg_pairs(root)
            if unpaired:
                raise listing_error(unpacked.rename(str(root)), "slice(s) without a partner image/mask", unpaired)
            if not pairs:
                raise DataError(f"{unpacked.rename(str(root))}: no <patient>_N.tif / _mask.tif pairs ({self.layout})")
            subjects = [
                Subject(k, image=Source(img, tmp / pat / img.name), label=Source(msk, tmp / pat / msk.name))
                for pat, k, img, msk in pairs
            ]
            ingest(subjects, "check and copy LGG MRI", unpacked.rename)
        log.info("LGG MRI: %d slices of %d patients copied", len(pairs), len({p[0] for p in pairs}))

    def samples(self, raw_dir: Path, params: DataParams) -> list[RawSample]:
        raw = require_raw(raw_dir, self.name)
        pairs, unpaired = _lgg_pairs(raw)
        if unpaired:
            raise listing_error(raw, "slice(s) without a partner image/mask", unpaired)
        if not pairs:
            raise DataError(f"{raw}: no slices; run the download stage again")
        return [RawSample(id=k, image=img, label=msk, group=pat) for pat, k, img, msk in pairs]
