"""Non-fundus and generic sources: Kaggle LGG brain MRI, and any folder of image/label files."""

from __future__ import annotations

import glob
import logging
import re
from pathlib import Path

from vesselseg import imagefiles
from vesselseg.data.adapters import building, copy_files, find_dir, require_raw, scratch_dir, split_source, unpack_sources
from vesselseg.data.sample import RawSample
from vesselseg.errors import DataError, ParamsError
from vesselseg.params import DataParams

log = logging.getLogger(__name__)


def _listing_error(root: Path, what: str, names: list[str]) -> DataError:
    shown = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
    return DataError(f"{root}: {len(names)} {what}: {shown}")


# ---------------------------------------------------------------- LGG MRI

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
    layout = "the kaggle_3m folder (or the Kaggle zip): one folder per patient with <patient>_N.tif and <patient>_N_mask.tif"

    def materialize(self, raw_dir: Path, *, source: Path | None, params: DataParams) -> None:
        paths = split_source(source, self.name, self.layout)
        with scratch_dir(Path(raw_dir)) as scratch, building(raw_dir, self.name) as tmp:
            root = find_dir(unpack_sources(paths, scratch), _is_lgg_root, "patient folders with *_mask.tif (kaggle_3m)")
            pairs, unpaired = _lgg_pairs(root)
            if unpaired:
                raise _listing_error(root, "slice(s) without a partner image/mask", unpaired)
            if not pairs:
                raise DataError(f"{root}: no <patient>_N.tif / _mask.tif pairs ({self.layout})")
            copy_files([(f, tmp / pat / f.name) for pat, _, img, msk in pairs for f in (img, msk)], "copy LGG MRI")
        log.info("LGG MRI: %d slices of %d patients copied", len(pairs), len({p[0] for p in pairs}))

    def samples(self, raw_dir: Path, params: DataParams) -> list[RawSample]:
        raw = require_raw(raw_dir, self.name)
        pairs, unpaired = _lgg_pairs(raw)
        if unpaired:
            raise _listing_error(raw, "slice(s) without a partner image/mask", unpaired)
        if not pairs:
            raise DataError(f"{raw}: no slices; run the download stage again")
        return [RawSample(id=k, image=img, label=msk, group=pat) for pat, k, img, msk in pairs]


# ---------------------------------------------------------------- any folder

# Pairing rule: a file's key is its stem with known role suffixes stripped from the
# end, repeatedly, case-insensitively ("21_training_mask" -> "21_training" -> "21").
# Images, labels and FOV masks pair when their keys are equal.
ROLE_SUFFIX = re.compile(
    r"[_\-.](mask|masks|label|labels|manual\d?|gt|seg|segmentation|vessels?|fov|image|img|training|train|test)$", re.IGNORECASE
)


def pairing_key(stem: str) -> str:
    """The key images and labels are paired by (see ROLE_SUFFIX)."""
    while True:
        stripped = ROLE_SUFFIX.sub("", stem)
        if stripped == stem or not stripped:
            return stem
        stem = stripped


def _keyed(files: list[Path], role: str, root: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    clash: list[str] = []
    for f in files:
        k = pairing_key(f.stem)
        if k in out:
            clash.append(f"{out[k].name} / {f.name}")
        out[k] = f
    if clash:
        raise _listing_error(root, f"{role} file pair(s) with the same pairing key", clash)
    return out


def _image_files(paths: list[str]) -> list[Path]:
    return sorted(Path(p) for p in paths if Path(p).is_file() and Path(p).suffix.lower() in imagefiles.IMAGE_SUFFIXES)


class FolderAdapter:
    """Any images with labels, chosen by ``data.folder.images|labels|fov`` glob patterns.

    Relative patterns are resolved against ``data.source`` when it is a folder, else the
    working directory; ``**`` recurses.  Files pair by :func:`pairing_key`.
    """

    name = "folder"

    def materialize(self, raw_dir: Path, *, source: Path | None, params: DataParams) -> None:
        f = params.folder
        base = Path(str(source)) if source is not None else Path.cwd()
        if source is not None and not base.is_dir():
            raise ParamsError(f"data.source: {base} must be a folder for dataset 'folder'")
        found: dict[str, list[Path]] = {}
        for role, pattern in (("images", f.images), ("labels", f.labels), ("fov", f.fov)):
            if pattern is None:
                if role != "fov":
                    raise ParamsError(f"data.folder.{role}: not set; give a glob pattern such as 'images/*.png'")
                continue
            full = pattern if Path(pattern).is_absolute() else str(base / pattern)
            files = _image_files(glob.glob(full, recursive=True))
            if not files:
                raise ParamsError(f"data.folder.{role}: pattern {pattern!r} matches no image files under {base}")
            names = [p.name for p in files]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise _listing_error(base, f"{role} file name(s) matched twice (in different folders)", dup)
            found[role] = files
        _pair(base, found)  # fail before copying anything
        with building(raw_dir, self.name) as tmp:
            copy_files([(p, tmp / role / p.name) for role, files in found.items() for p in files], "copy folder")

    def samples(self, raw_dir: Path, params: DataParams) -> list[RawSample]:
        raw = require_raw(raw_dir, self.name)
        found = {role: _image_files([str(p) for p in (raw / role).glob("*")]) for role in ("images", "labels", "fov") if (raw / role).is_dir()}
        return _pair(raw, found)


def _pair(root: Path, found: dict[str, list[Path]]) -> list[RawSample]:
    images = _keyed(found.get("images", []), "image", root)
    labels = _keyed(found.get("labels", []), "label", root)
    fovs = _keyed(found["fov"], "FOV", root) if "fov" in found else None
    unpaired = [f"image {images[k].name}" for k in sorted(images.keys() - labels.keys())]
    unpaired += [f"label {labels[k].name}" for k in sorted(labels.keys() - images.keys())]
    if fovs is not None:
        unpaired += [f"image {images[k].name} (no FOV)" for k in sorted(images.keys() - fovs.keys())]
        unpaired += [f"FOV {fovs[k].name}" for k in sorted(fovs.keys() - images.keys())]
    if unpaired:
        raise _listing_error(root, "unpaired file(s) (pairing strips suffixes like _mask, _label, _manual1 from stems)", unpaired)
    if not images:
        raise DataError(f"{root}: no images found")
    return [RawSample(id=k, image=images[k], label=labels[k], fov=fovs[k] if fovs else None) for k in sorted(images, key=imagefiles.natural_key)]
