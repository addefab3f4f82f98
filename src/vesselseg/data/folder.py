"""Any folder of images with labels (and optionally FOV masks): ``data.dataset: folder``."""

from __future__ import annotations

import glob
import logging
import re
from pathlib import Path

from vesselseg import imagefiles
from vesselseg.data.adapters import building, listing_error, require_raw
from vesselseg.data.ingest import Source, Subject, ingest
from vesselseg.data.sample import RawSample
from vesselseg.errors import DataError, ParamsError
from vesselseg.params import DataParams

log = logging.getLogger(__name__)

# Pairing rule: a file's key is its stem with known role suffixes stripped from the
# end, repeatedly, case-insensitively ("21_training_mask" -> "21_training" -> "21").
# Images, labels and FOV masks pair when their keys are equal.
ROLE_SUFFIX = re.compile(
    r"[_\-.](mask|masks|label|labels|manual\d?|gt|seg|segmentation|vessels?|fov|image|img|training|train|test)$",
    re.IGNORECASE,
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
        raise listing_error(root, f"{role} file pair(s) with the same pairing key", clash)
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
                raise listing_error(base, f"{role} file name(s) matched twice (in different folders)", dup)
            found[role] = files
        pairs = _pair(base, found)  # fail on names before reading any file
        with building(raw_dir, self.name) as tmp:
            ingest([_subject(s, tmp) for s in pairs], "check and copy folder")

    def samples(self, raw_dir: Path, params: DataParams) -> list[RawSample]:
        raw = require_raw(raw_dir, self.name)
        found = {
            role: _image_files([str(p) for p in (raw / role).glob("*")])
            for role in ("images", "labels", "fov")
            if (raw / role).is_dir()
        }
        return _pair(raw, found)


def _copy_name(path: Path, tmp: Path, role: str) -> Source:
    """Where a file's copy goes; labels and FOV masks in a lossy format (JPEG) are stored
    as PNG, so that thresholding them once keeps them binary."""
    name = path.name
    if role != "images" and path.suffix.lower() in (".jpg", ".jpeg"):
        name = path.with_suffix(".png").name
    return Source(path, tmp / role / name)


def _subject(s: RawSample, tmp: Path) -> Subject:
    assert s.image is not None
    fov = _copy_name(s.fov, tmp, "fov") if s.fov is not None else None
    return Subject(s.id, image=_copy_name(s.image, tmp, "images"), label=_copy_name(s.label, tmp, "labels"), fov=fov)


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
        raise listing_error(
            root, "unpaired file(s) (pairing strips suffixes like _mask, _label, _manual1 from stems)", unpaired
        )
    if not images:
        raise DataError(f"{root}: no images found")
    return [
        RawSample(id=k, image=images[k], label=labels[k], fov=fovs[k] if fovs else None)
        for k in sorted(images, key=imagefiles.natural_key)
    ]
