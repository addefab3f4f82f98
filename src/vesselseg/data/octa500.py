"""OCTA-500 (Li et al., Medical Image Analysis 2024) and its generated stand-in.

Two layouts of a user's copy are accepted:

* the 2D release (e.g. ``OCTA-500_3M_2D``): ``Training|Validation|Test/*_images/NNNNN.bmp``
  and ``*_labels/NNNNN.bmp``, one en-face projection and one label per subject;
* the dataset as distributed: ``OCTA_3mm|OCTA_6mm/OCTA/<id>/<k>.bmp`` B-scan volumes,
  ``Projection Maps/<projection>/<id>.bmp`` and ``GT_*/<id>.bmp``, from which
  ``data.octa500.subset``, ``label`` and ``projection`` pick (``projection: volume``
  uses the B-scans and lets the prepare stage project them).

Either way the raw folder gets one layout: ``images/<id>.bmp`` or ``volumes/<id>/``,
``labels/<id>.bmp`` and ``octa500.json`` recording what was picked, so that a params
change without a new download stage is caught instead of silently ignored.

Official split, by subject id in order: 6 mm (10001-10300) 180 train / 20 val / 100
test; 3 mm (10301-10500) 140 / 10 / 50.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from vesselseg import atomic, imagefiles
from vesselseg.data.adapters import (
    building,
    find_dir,
    missing_error,
    require_raw,
    split_source,
    unpacked_source,
)
from vesselseg.data.ingest import Source, Subject, VolumeSource, ingest
from vesselseg.data.sample import RawSample, Split
from vesselseg.errors import DataError, ParamsError
from vesselseg.params import DataParams

log = logging.getLogger(__name__)

# subset -> (first id, last id, n_train, n_val); the rest are test.
SUBSETS: dict[str, tuple[int, int, int, int]] = {"6M": (10001, 10300, 180, 20), "3M": (10301, 10500, 140, 10)}
SUBSET_DIRS = {"3M": "OCTA_3mm", "6M": "OCTA_6mm"}
VOLUME = "volume"
LAYOUT = (
    "the OCTA-500 folder (OCTA_3mm|OCTA_6mm with OCTA/, 'Projection Maps'/ and GT_*/) "
    "or the 2D release (Training|Validation[|Test]/*_images and *_labels)"
)
_SPLIT_DIRS = {"training": "train", "validation": "val", "test": "test", "testing": "test"}


def official_split(subject: int, subset: str) -> Split:
    """The OCTA-500 split of one subject id; DataError when it is not in ``subset``."""
    first, last, n_train, n_val = SUBSETS[subset]
    if not first <= subject <= last:
        raise DataError(
            f"subject {subject} is not an OCTA-500 {subset} subject ({first}-{last}); check data.octa500.subset"
        )
    k = subject - first
    return "train" if k < n_train else "val" if k < n_train + n_val else "test"


def _subject_id(path: Path) -> int | None:
    return int(path.stem) if path.stem.isdigit() else None


def _is_2d_root(d: Path) -> bool:
    return any(c.is_dir() and c.name.lower() in _SPLIT_DIRS and any(c.glob("*_images")) for c in d.iterdir())


class Octa500Adapter:
    name = "octa500"

    def materialize(self, raw_dir: Path, *, source: Path | None, params: DataParams) -> None:
        paths = split_source(source, self.name, LAYOUT)
        p = params.octa500
        sub = SUBSET_DIRS[p.subset]
        with unpacked_source(paths, Path(raw_dir)) as unpacked, building(raw_dir, self.name) as tmp:
            bases = unpacked.bases
            try:
                root = find_dir(bases, lambda d: d.name == sub or (d / sub).is_dir(), f"{sub}/")
                layout = "full"
            except DataError:
                try:
                    root = find_dir(bases, _is_2d_root, "Training|Validation/*_images (OCTA-500 2D)")
                except DataError:
                    raise DataError(
                        f"{source}: neither {sub}/ nor the 2D release found; data.source must be {LAYOUT}"
                    ) from None
                layout = "2d"
            if layout == "full":
                subjects = self._full(root if root.name == sub else root / sub, tmp, p.subset, p.label, p.projection)
            else:
                log.info("%s: OCTA-500 2D release; data.octa500.label and .projection do not apply (one map, one label)",
                         unpacked.rename(str(root)))  # fmt: skip
                subjects = self._flat(root, tmp, p.subset, p.projection, unpacked.rename)
            ingest(subjects, "check and copy OCTA-500", unpacked.rename)
            meta = {"layout": layout, "subset": p.subset, "label": p.label if layout == "full" else None,
                    "projection": p.projection if layout == "full" else "2d-release"}  # fmt: skip
            atomic.write_json(tmp / "octa500.json", meta)
        log.info("OCTA-500 (%s layout, %s): %d subjects copied into %s", layout, p.subset, len(subjects), raw_dir)

    @staticmethod
    def _full(root: Path, tmp: Path, subset: str, label: str, projection: str) -> list[Subject]:
        available = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name.startswith("GT_"))
        if not (root / label).is_dir():
            raise ParamsError(
                f"data.octa500.label: {label!r} not found in {root} (available: {', '.join(available) or 'none'})"
            )
        if projection == VOLUME:
            src_dir = root / "OCTA"
            subjects = (
                {int(d.name): d for d in src_dir.iterdir() if d.is_dir() and d.name.isdigit()}
                if src_dir.is_dir()
                else {}
            )
        else:
            maps = root / "Projection Maps"
            if not (maps / projection).is_dir():
                have = sorted(d.name for d in maps.iterdir() if d.is_dir()) if maps.is_dir() else []
                raise ParamsError(
                    f"data.octa500.projection: {projection!r} not found in {maps} (available: {', '.join(have) or 'none'}, or 'volume')"
                )
            subjects = {i: f for f in (maps / projection).iterdir() if (i := _subject_id(f)) is not None}
        labels = {i: f for f in (root / label).iterdir() if (i := _subject_id(f)) is not None}
        if not subjects:
            raise DataError(f"{root}: no OCTA-500 subjects found for projection {projection!r}")
        missing = [f"{label}/{i}.bmp" for i in sorted(subjects.keys() - labels.keys())]
        if missing:
            raise missing_error(root, missing, "OCTA-500")
        for i in subjects:
            official_split(i, subset)  # every id must belong to the chosen subset
        out: list[Subject] = []
        for i, src in sorted(subjects.items()):
            lab = Source(labels[i], tmp / "labels" / f"{i}.bmp")
            if projection == VOLUME:
                out.append(
                    Subject(
                        str(i),
                        label=lab,
                        volume=VolumeSource(tuple(imagefiles.list_slices(src)), tmp / "volumes" / str(i)),
                    )
                )
            else:
                out.append(Subject(str(i), label=lab, image=Source(src, tmp / "images" / f"{i}.bmp")))
        return out

    @staticmethod
    def _flat(root: Path, tmp: Path, subset: str, projection: str, rename: Callable[[str], str]) -> list[Subject]:
        if projection == VOLUME:
            raise ParamsError(
                f"data.octa500.projection: 'volume' needs the B-scan volumes, but {root} is the 2D release (projections only)"
            )
        pairs: list[Subject] = []
        missing: list[str] = []
        for split_dir in sorted(c for c in root.iterdir() if c.is_dir() and c.name.lower() in _SPLIT_DIRS):
            for images in sorted(split_dir.glob("*_images")):
                labels = images.with_name(images.name[: -len("_images")] + "_labels")
                for img in sorted(images.glob("*.bmp")):
                    i = _subject_id(img)
                    if i is None:
                        continue
                    if official_split(i, subset) != _SPLIT_DIRS[split_dir.name.lower()]:
                        log.warning(
                            "%s: in %s/ but the official split puts subject %d in %s",
                            rename(str(img)),
                            split_dir.name,
                            i,
                            official_split(i, subset),
                        )
                    lab = labels / img.name
                    if not lab.is_file():
                        missing.append(str(lab.relative_to(root)))
                        continue
                    pairs.append(
                        Subject(
                            str(i),
                            image=Source(img, tmp / "images" / f"{i}.bmp"),
                            label=Source(lab, tmp / "labels" / f"{i}.bmp"),
                        )
                    )
        if missing:
            raise missing_error(root, missing, "OCTA-500 2D")
        if not pairs:
            raise DataError(f"{root}: no *_images/NNNNN.bmp files found ({LAYOUT})")
        return pairs

    def samples(self, raw_dir: Path, params: DataParams) -> list[RawSample]:
        raw = require_raw(raw_dir, self.name)
        meta_file = raw / "octa500.json"
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, json.JSONDecodeError):
            raise DataError(f"{meta_file}: missing or unreadable; run the download stage again") from None
        p = params.octa500
        wanted: dict[str, str] = {"subset": p.subset}
        if meta.get("layout") == "full":
            wanted.update(label=p.label, projection=p.projection)
        stale = [f"data.octa500.{k}={v!r} (raw has {meta.get(k)!r})" for k, v in wanted.items() if meta.get(k) != v]
        if stale:
            raise DataError(f"{raw}: materialized with other params: {', '.join(stale)}; run the download stage again")
        samples = []
        for lab in sorted((raw / "labels").glob("*.bmp"), key=lambda f: int(f.stem)):
            i = int(lab.stem)
            vol, img = raw / "volumes" / lab.stem, raw / "images" / lab.name
            split = official_split(i, p.subset)
            if vol.is_dir():
                samples.append(RawSample(id=lab.stem, volume=vol, label=lab, split=split))
            elif img.is_file():
                samples.append(RawSample(id=lab.stem, image=img, label=lab, split=split))
            else:
                raise DataError(f"{raw}: subject {i} has a label but no image or volume; run the download stage again")
        if not samples:
            raise DataError(f"{raw}: no OCTA-500 subjects; run the download stage again")
        return samples


class SyntheticOctaAdapter:
    """Generated OCTA-500-like volumes (``OCTA/<subject>/<k>.bmp``, ``GT/<subject>.bmp``)."""

    name = "synthetic"

    def materialize(self, raw_dir: Path, *, source: Path | None, params: DataParams) -> None:
        from vesselseg.data.synthetic_octa import generate_octa_dataset  # another module's job

        if source is not None:
            log.warning("data.source is ignored for the generated dataset %r", self.name)
        s = params.synthetic
        with building(raw_dir, self.name) as tmp:
            generate_octa_dataset(
                tmp,
                n_subjects=s.n_subjects,
                n_bscans=s.n_bscans,
                depth=s.depth,
                width=s.width,
                slab=(s.slab[0], s.slab[1]),
                seed=params.seed,
            )

    def samples(self, raw_dir: Path, params: DataParams) -> list[RawSample]:
        raw = require_raw(raw_dir, self.name)
        subjects = sorted((d for d in (raw / "OCTA").glob("*") if d.is_dir()), key=imagefiles.natural_key)
        missing = [f"GT/{d.name}.bmp" for d in subjects if not (raw / "GT" / f"{d.name}.bmp").is_file()]
        if missing:
            raise missing_error(raw, missing, self.name)
        if not subjects:
            raise DataError(f"{raw}: no OCTA/<subject>/ folders; run the download stage again")
        return [RawSample(id=d.name, volume=d, label=raw / "GT" / f"{d.name}.bmp") for d in subjects]
