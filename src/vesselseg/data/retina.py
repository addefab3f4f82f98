"""Fundus datasets: DRIVE (and its synthetic twin), HRF, CHASE_DB1, STARE, Kaggle retina.

Each adapter copies the files it needs into the raw folder in one fixed layout,
so ``samples`` never depends on how the user's copy or the archive was arranged.
Sets without official field-of-view masks (CHASE_DB1, STARE, Kaggle retina) get one
derived from the image at materialize time (:mod:`vesselseg.data.fov`), written as
``fov/<id>.png``: RawSample carries paths, and deriving once keeps prepare cheap.

Splits.  DRIVE: the official training (21-40) / test (01-20) split.  HRF has none; we
use the first five images of each category (healthy, diabetic, glaucoma) for
training and the other 30 for testing (the split we recall from Orlando et al., IEEE
TBME 2017; not re-checked against the paper, which could not be reached offline).
CHASE_DB1: the common protocol of the first 20 images (children 01-10) for training
and the last 8 for testing.  STARE (20 labelled images): first 10 train, last 10
test, by file name.  Validation images are held out of "train" by the prepare stage.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from vesselseg.data.adapters import (
    Unpacked,
    building,
    find_dir,
    missing_error,
    require_raw,
    split_source,
    unpacked_source,
)
from vesselseg.data.download import DownloadSpec, download, pin_text, sha256_of, verify
from vesselseg.data.ingest import Source, Subject, ingest
from vesselseg.data.sample import RawSample, Split
from vesselseg.errors import DataError, DownloadError
from vesselseg.params import DataParams

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- DRIVE layout

DRIVE_PARTS: tuple[tuple[str, Split], ...] = (("training", "train"), ("test", "test"))
DRIVE_NUMBERS = {"training": range(21, 41), "test": range(1, 21)}
DRIVE_LAYOUT = (
    "the DRIVE folder or zip(s) holding training/ and test/, each with images/NN_<part>.tif, "
    "1st_manual/NN_manual1.gif and mask/NN_<part>_mask.gif"
)


def drive_files(part: str, num: str) -> tuple[str, str, str]:
    """Relative paths of image, label and FOV of one DRIVE image (``num`` like "21")."""
    return (
        f"{part}/images/{num}_{part}.tif",
        f"{part}/1st_manual/{num}_manual1.gif",
        f"{part}/mask/{num}_{part}_mask.gif",
    )


def scan_drive(root: Path, dataset: str = "drive") -> list[RawSample]:
    """List a DRIVE-layout folder; training images are split "train", test images "test"."""
    samples: list[RawSample] = []
    missing: list[str] = []
    for part, split in DRIVE_PARTS:
        for img in sorted((root / part / "images").glob(f"*_{part}.tif")):
            num = img.stem[: -len(part) - 1]
            _, lab, fov = drive_files(part, num)
            missing += [r for r in (lab, fov) if not (root / r).is_file()]
            samples.append(RawSample(id=img.stem, image=img, label=root / lab, fov=root / fov, split=split))
    if missing:
        raise missing_error(root, missing, dataset)
    if not samples:
        raise DataError(f"{root}: no {dataset} images found (expected {DRIVE_LAYOUT})")
    return samples


def _holds_images(part: str) -> Callable[[Path], bool]:
    return lambda d: (d / part / "images").is_dir()


class DriveAdapter:
    """DRIVE, bring your own (its terms forbid redistribution): copied, checked, never linked."""

    name = "drive"

    def materialize(self, raw_dir: Path, *, source: Path | None, params: DataParams) -> None:
        paths = split_source(source, self.name, DRIVE_LAYOUT)
        with unpacked_source(paths, Path(raw_dir)) as unpacked, building(raw_dir, self.name) as tmp:
            subjects: list[Subject] = []
            missing: list[str] = []
            for part, _ in DRIVE_PARTS:
                root = find_dir(unpacked.bases, _holds_images(part), f"{part}/images/ (DRIVE layout)")
                for n in DRIVE_NUMBERS[part]:
                    rels = drive_files(part, f"{n:02d}")
                    missing += [rel for rel in rels if not (root / rel).is_file()]
                    image, label, fov = (Source(root / rel, tmp / rel) for rel in rels)
                    subjects.append(Subject(f"{n:02d}_{part}", image=image, label=label, fov=fov))
            if missing:
                raise missing_error(Path(str(source)), missing, "DRIVE")
            ingest(subjects, "check and copy DRIVE", unpacked.rename)
        log.info("DRIVE: %d images with labels and FOV masks copied into %s", len(subjects), raw_dir)

    def samples(self, raw_dir: Path, params: DataParams) -> list[RawSample]:
        return scan_drive(require_raw(raw_dir, self.name), "DRIVE")


class SyntheticFundusAdapter:
    """Generated fundus-like images in the DRIVE layout: the pipeline's offline stand-in."""

    name = "synthetic-fundus"

    def materialize(self, raw_dir: Path, *, source: Path | None, params: DataParams) -> None:
        from vesselseg.data.synthetic_fundus import generate_fundus_dataset  # another module's job

        if source is not None:
            log.warning("data.source is ignored for the generated dataset %r", self.name)
        p = params.synthetic_fundus
        with building(raw_dir, self.name) as tmp:
            generate_fundus_dataset(tmp, n_images=p.n_images, size=p.size, seed=params.seed)

    def samples(self, raw_dir: Path, params: DataParams) -> list[RawSample]:
        return scan_drive(require_raw(raw_dir, self.name), self.name)


# ---------------------------------------------------------------- downloaded sets


DOWNLOAD_DIR_ENV = "VESSELSEG_DOWNLOAD_DIR"


def download_dir() -> Path:
    """Where verified archives are kept: ``$VESSELSEG_DOWNLOAD_DIR``, else the user cache.

    Not under ``data/raw`` (swapped out whole by every materialize) nor in the
    repository (git would see it; ``dvc exp run --temp`` copies would lose it): a
    user-level cache survives both, like torchvision's and MONAI's download roots.
    """
    env = os.environ.get(DOWNLOAD_DIR_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
    return Path(cache) / "vesselseg" / "downloads"


def obtain(
    specs: tuple[DownloadSpec, ...], raw_dir: Path, source: Path | None, dataset: str, layout: str
) -> list[Path]:
    """The archives (or folders) holding the dataset: the user's ``data.source`` or downloads.

    A user's archive named like a pinned spec is held to that pin: the pin is what
    makes two runs on two machines use the same data.
    """
    if source is None:
        return [download(spec, download_dir()) for spec in specs]
    paths = split_source(source, dataset, layout)
    by_name = {s.filename: s for s in specs}
    for p in paths:
        if not p.is_file():
            continue
        spec = by_name.get(p.name)
        if spec is None:
            log.warning("%s: no pinned checksum to compare with; its sha256 %s", p, sha256_of(p))
            continue
        ok, actual = verify(spec, p)
        if ok is False:
            raise DownloadError(f"{p}: {actual} does not match the pinned {pin_text(spec)} of {spec.url}")
        if ok is None:
            log.warning("%s: no pinned checksum to compare with; its %s", p, actual)
    return paths


def _listing(root: Path) -> dict[str, Path]:
    """Case-insensitive file index of one folder: HRF mixes ``.jpg`` and ``.JPG``."""
    return {p.name.lower(): p for p in root.iterdir() if p.is_file()} if root.is_dir() else {}


# (id, image, label, FOV or None, split), paths relative to the raw folder
Row = tuple[str, str, str, str | None, Split]


def _samples_from(raw: Path, rows: list[Row]) -> list[RawSample]:
    """Build samples from (id, image, label, fov, split) relative paths, checking each exists."""
    missing = [r for row in rows for r in row[1:4] if r is not None and not (raw / r).is_file()]
    if missing:
        raise missing_error(raw, missing, raw.name)
    return [
        RawSample(id=i, image=raw / im, label=raw / lab, fov=raw / fov if fov else None, split=s)
        for i, im, lab, fov, s in rows
    ]


HRF_CATEGORIES = ("h", "dr", "g")
HRF_TRAIN_PER_CATEGORY = 5


class HrfAdapter:
    """High-Resolution Fundus (Budai et al. 2013), downloaded from FAU."""

    name = "hrf"
    specs = (
        DownloadSpec(
            url="https://www5.cs.fau.de/fileadmin/research/datasets/fundus-images/all.zip",
            sha256="a914d02cda161b7f33f25d0397c276d50e9a6cbc705e9b364a54f0adafed57e4",
            filename="hrf_all.zip",
        ),
    )
    layout = "the HRF all.zip or its extracted folder (images/, manual1/, mask/)"

    @staticmethod
    def expected() -> list[tuple[str, str, str]]:
        """(id, label file, fov file) for all 45 images; the image suffix varies in case."""
        return [
            (f"{n:02d}_{c}", f"{n:02d}_{c}.tif", f"{n:02d}_{c}_mask.tif") for c in HRF_CATEGORIES for n in range(1, 16)
        ]

    def materialize(self, raw_dir: Path, *, source: Path | None, params: DataParams) -> None:
        paths = obtain(self.specs, Path(raw_dir), source, self.name, self.layout)
        with unpacked_source(paths, Path(raw_dir)) as unpacked, building(raw_dir, self.name) as tmp:
            root = find_dir(
                unpacked.bases,
                lambda d: all((d / s).is_dir() for s in ("images", "manual1", "mask")),
                "images/, manual1/ and mask/ (HRF)",
            )
            images, labels, masks = (_listing(root / s) for s in ("images", "manual1", "mask"))
            subjects: list[Subject] = []
            missing: list[str] = []
            for id_, lab, fov in self.expected():
                found: list[Source] = []
                for sub, name, index in (
                    ("images", f"{id_}.jpg", images),
                    ("manual1", lab, labels),
                    ("mask", fov, masks),
                ):
                    src = index.get(name.lower())
                    if src is None:
                        missing.append(f"{sub}/{name}")
                    else:
                        found.append(Source(src, tmp / sub / name))
                if len(found) == 3:
                    subjects.append(Subject(id_, image=found[0], label=found[1], fov=found[2]))
            if missing:
                raise missing_error(Path(unpacked.rename(str(root))), missing, "HRF")
            ingest(subjects, "check and copy HRF", unpacked.rename)

    def samples(self, raw_dir: Path, params: DataParams) -> list[RawSample]:
        raw = require_raw(raw_dir, self.name)
        rows: list[Row] = [
            (
                id_,
                f"images/{id_}.jpg",
                f"manual1/{lab}",
                f"mask/{fov}",
                "train" if int(id_[:2]) <= HRF_TRAIN_PER_CATEGORY else "test",
            )
            for id_, lab, fov in self.expected()
        ]
        return _samples_from(raw, rows)


CHASE_TRAIN_CHILDREN = 10


class ChaseAdapter:
    """CHASE_DB1 (Fraz et al. 2012): 28 images of 14 children, first observer's labels."""

    name = "chase_db1"
    # Kingston's repository publishes no checksum and this project was built offline, so
    # no sha256 could be computed here.  The archive's md5 is pinned by a public
    # downstream loader (a CHASEDB1 dataset class, `_zip_md5`), so that is the pin;
    # VESSELSEG_SHA256_CHASEDB1_ZIP set by a user who checked the file wins over it.
    specs = (
        DownloadSpec(
            url="https://researchdata.kingston.ac.uk/96/1/CHASEDB1.zip",
            sha256=None,
            filename="CHASEDB1.zip",
            md5="d9e47c4bac125b29996fae4380a68db1",
        ),
    )
    layout = "CHASEDB1.zip or its extracted folder (Image_01L.jpg, Image_01L_1stHO.png, ...)"

    @staticmethod
    def ids() -> list[str]:
        return [f"Image_{n:02d}{eye}" for n in range(1, 15) for eye in "LR"]

    def materialize(self, raw_dir: Path, *, source: Path | None, params: DataParams) -> None:
        paths = obtain(self.specs, Path(raw_dir), source, self.name, self.layout)
        with unpacked_source(paths, Path(raw_dir)) as unpacked, building(raw_dir, self.name) as tmp:
            root = find_dir(unpacked.bases, lambda d: "image_01l.jpg" in _listing(d), "Image_01L.jpg (CHASE_DB1)")
            index = _listing(root)
            subjects: list[Subject] = []
            missing: list[str] = []
            for id_ in self.ids():
                image, label = index.get(f"{id_}.jpg".lower()), index.get(f"{id_}_1stHO.png".lower())
                missing += [name for name, src in ((f"{id_}.jpg", image), (f"{id_}_1stHO.png", label)) if src is None]
                if image is not None and label is not None:
                    subjects.append(Subject(id_, image=Source(image, tmp / "images" / f"{id_}.jpg"),
                                            label=Source(label, tmp / "labels" / f"{id_}_1stHO.png"),
                                            derive_fov=tmp / "fov" / f"{id_}.png"))  # fmt: skip
            if missing:
                raise missing_error(Path(unpacked.rename(str(root))), missing, "CHASE_DB1")
            ingest(subjects, "check and copy CHASE_DB1", unpacked.rename)

    def samples(self, raw_dir: Path, params: DataParams) -> list[RawSample]:
        raw = require_raw(raw_dir, self.name)
        rows: list[Row] = [
            (
                i,
                f"images/{i}.jpg",
                f"labels/{i}_1stHO.png",
                f"fov/{i}.png",
                "train" if int(i[6:8]) <= CHASE_TRAIN_CHILDREN else "test",
            )
            for i in self.ids()
        ]
        return _samples_from(raw, rows)


STARE_IDS = (
    "im0001", "im0002", "im0003", "im0004", "im0005", "im0044", "im0077", "im0081", "im0082", "im0139",
    "im0162", "im0163", "im0235", "im0236", "im0239", "im0240", "im0255", "im0291", "im0319", "im0324",
)  # fmt: skip


class StareAdapter:
    """STARE (Hoover et al. 2000): the 20 images with Hoover's ("ah") vessel labels."""

    name = "stare"
    # Clemson publishes no checksums; these sha256 pins are torch-em's
    # (torch_em/data/datasets/medical/stare.py, CHECKSUM), for the same two files.
    specs = (
        DownloadSpec(
            url="https://cecas.clemson.edu/~ahoover/stare/probing/stare-images.tar",
            sha256="5f7b509b6067cad4f1be84933145d783de9ec087b3eaaf4db0103dd0144dd433",
            filename="stare-images.tar",
        ),
        DownloadSpec(
            url="https://cecas.clemson.edu/~ahoover/stare/probing/labels-ah.tar",
            sha256="ebf2f1e17ca955f24579d9edd990e2dae79a5c82def69f0985d8e24f826ddd2f",
            filename="labels-ah.tar",
        ),
    )
    layout = "stare-images.tar and labels-ah.tar (joined with ':') or a folder holding their files (im0001.ppm[.gz], im0001.ah.ppm[.gz])"

    def materialize(self, raw_dir: Path, *, source: Path | None, params: DataParams) -> None:
        paths = obtain(self.specs, Path(raw_dir), source, self.name, self.layout)
        with unpacked_source(paths, Path(raw_dir)) as unpacked, building(raw_dir, self.name) as tmp:
            # The two tars unpack flat; index every file under every base by lower-case name.
            index = {p.name.lower(): p for b in unpacked.bases for p in sorted(b.rglob("*")) if p.is_file()}
            missing = [f"{name}[.gz]" for id_ in STARE_IDS for name in (f"{id_}.ppm", f"{id_}.ah.ppm")
                       if name not in index and name + ".gz" not in index]  # fmt: skip
            if missing:
                raise missing_error(Path(str(source or download_dir())), missing, "STARE")
            subjects: list[Subject] = []
            for id_ in tqdm(STARE_IDS, desc="STARE gunzip", unit="img", disable=None, leave=False):
                image, label = (
                    Source(
                        _plain(index.get(name) or index[name + ".gz"], unpacked.scratch / "gunzip", unpacked),
                        tmp / sub / name,
                    )
                    for name, sub in ((f"{id_}.ppm", "images"), (f"{id_}.ah.ppm", "labels"))
                )
                subjects.append(Subject(id_, image=image, label=label, derive_fov=tmp / "fov" / f"{id_}.png"))
            ingest(subjects, "check and copy STARE", unpacked.rename)

    def samples(self, raw_dir: Path, params: DataParams) -> list[RawSample]:
        raw = require_raw(raw_dir, self.name)
        rows: list[Row] = [
            (i, f"images/{i}.ppm", f"labels/{i}.ah.ppm", f"fov/{i}.png", "train" if k < len(STARE_IDS) // 2 else "test")
            for k, i in enumerate(STARE_IDS)
        ]
        return _samples_from(raw, rows)


def _plain(src: Path, folder: Path, unpacked: Unpacked) -> Path:
    """STARE ships each PPM gzip-compressed inside the tar: the file to read, decompressed
    into scratch ``folder`` when it is a ``.gz`` (and named as the ``.gz`` in messages)."""
    if src.suffix.lower() != ".gz":
        return src
    out = folder / src.with_suffix("").name
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with gzip.open(src, "rb") as fin, open(out, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    except (OSError, EOFError) as err:
        raise DataError(f"{unpacked.rename(str(src))}: not a readable gzip file ({err})") from None
    unpacked.alias(out, unpacked.rename(str(src)))
    return out


# ---------------------------------------------------------------- Kaggle retina


class RetinaKaggleAdapter:
    """Kaggle "Retina Blood Vessel" (train|test/image|mask/*.png).

    It is DRIVE resized to 512x512 and augmented: never combine it with DRIVE (the
    test images overlap DRIVE's).  Its masks were interpolated, so they are
    thresholded at half their maximum once, here, and stored as {0, 255}.
    """

    name = "retina_kaggle"
    layout = "the Kaggle folder or zip holding train/ and test/, each with image/*.png and mask/*.png"

    def materialize(self, raw_dir: Path, *, source: Path | None, params: DataParams) -> None:
        paths = split_source(source, self.name, self.layout)
        log.warning("retina_kaggle is DRIVE resized and augmented: do not combine or compare it with DRIVE")
        with unpacked_source(paths, Path(raw_dir)) as unpacked, building(raw_dir, self.name) as tmp:
            root = find_dir(
                unpacked.bases,
                lambda d: (d / "train" / "image").is_dir() and (d / "train" / "mask").is_dir(),
                "train/image/ and train/mask/ (Kaggle retina)",
            )
            unpaired: list[str] = []
            subjects: list[Subject] = []
            for split in ("train", "test"):
                images = {p.stem: p for p in (root / split / "image").glob("*.png")}
                masks = {p.stem: p for p in (root / split / "mask").glob("*.png")}
                unpaired += [f"{split}/image/{s}.png" for s in sorted(images.keys() - masks.keys())]
                unpaired += [f"{split}/mask/{s}.png" for s in sorted(masks.keys() - images.keys())]
                for stem in sorted(images.keys() & masks.keys()):
                    id_ = f"{split}_{stem}"
                    subjects.append(Subject(id_, image=Source(images[stem], tmp / "images" / f"{id_}.png"),
                                            label=Source(masks[stem], tmp / "labels" / f"{id_}.png"),
                                            derive_fov=tmp / "fov" / f"{id_}.png"))  # fmt: skip
            shown = unpacked.rename(str(root))
            if unpaired:
                raise DataError(f"{shown}: files without a partner image/mask: {', '.join(unpaired[:12])}")
            if not subjects:
                raise DataError(f"{shown}: no image/mask pairs found ({self.layout})")
            # Its masks were interpolated: ingest thresholds each at half its maximum,
            # stores it binary and warns naming the mask.
            ingest(subjects, "check and copy Kaggle retina", unpacked.rename)

    def samples(self, raw_dir: Path, params: DataParams) -> list[RawSample]:
        raw = require_raw(raw_dir, self.name)
        ids = sorted(p.stem for p in (raw / "images").glob("*.png"))
        rows: list[Row] = [
            (i, f"images/{i}.png", f"labels/{i}.png", f"fov/{i}.png", "train" if i.startswith("train_") else "test")
            for i in ids
        ]
        if not rows:
            raise DataError(f"{raw}: no images; run the download stage again")
        return _samples_from(raw, rows)
