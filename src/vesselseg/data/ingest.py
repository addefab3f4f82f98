"""Check a user's files as they are ingested, before the new ``data/raw`` is swapped in.

The download stage builds ``data/raw`` under a temporary name and swaps it in only at
the end (:func:`vesselseg.data.adapters.building`).  Copying alone would let a broken
file (truncated, empty, not an image, a label of another size, an empty field-of-view
mask, an 8x8 thumbnail) replace a good ``data/raw``, and the prepare stage would then
fail naming the *copy*.  So every adapter that takes a user's files hands them to
:func:`ingest`, which reads each one with the pipeline's own readers
(:mod:`vesselseg.imagefiles`, the projection of :mod:`vesselseg.preprocess.projection`) and
stops at the first bad file, naming the user's file, while the previous ``data/raw``
is still in place.

What is checked, per subject: the image (or every B-scan of a volume) decodes, holds
no NaN/Inf and is at least :data:`MIN_IMAGE_SIDE` pixels on each side; the label and
FOV mask decode and have the image's size; the FOV mask is not empty.

Accepted inputs keep their documented decisions (16-bit images scaled to 8 bits, RGBA
loses alpha, a non-binary label is thresholded at half its maximum).  :mod:`vesselseg.imagefiles`
announces each such change with a warning naming the file it read; here those warnings
are caught while the user's file is read, re-issued naming the user's file, and the
*changed* pixels are what is stored in ``data/raw`` (in the destination's own format
when it is lossless).  The prepare stage then reads a file it need not change, so each
warning is said once, at ingestion, about the user's file.  A long run of the same
warning (all 100 interpolated masks of a Kaggle set) is shown for the first
:data:`WARNINGS_LISTED` files and then summed up in one line.

Written here rather than taken from a library: the rules are this pipeline's own (its
readers, its label policy, its minimum size), and no validation library knows them.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from vesselseg import imagefiles
from vesselseg.data.fov import fov_from_image
from vesselseg.errors import DataError

log = logging.getLogger(__name__)

#: The smallest image side ingested.  16 px is the smallest image that still holds one
#: patch of the smallest ``patches.size`` the schema allows (8) after halving
#: (``prepare.scale: 0.5``, the documented HRF setting), and the smallest side the
#: generated sets produce (``data.synthetic.width >= 16``).  Anything smaller (an 8x8
#: thumbnail) is not a segmentation image and cannot train under any patch setting; the
#: patches stage checks the actual ``patches.size`` against the prepared images.
MIN_IMAGE_SIDE = 16

#: How many files one kind of warning is listed for before the rest are summed up.
WARNINGS_LISTED = 5

#: Suffixes whose encoders store pixels exactly (a thresholded label stays binary).
_LOSSLESS = (".png", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".gif")


@dataclass(frozen=True)
class Source:
    """One file of the user's (as read: a folder's file or an archive's extracted
    member) and where its copy goes inside the folder being built."""

    path: Path
    dest: Path


@dataclass(frozen=True)
class VolumeSource:
    """A volume's B-scan files (in order) and the folder its copies go to."""

    slices: tuple[Path, ...]
    dest: Path


@dataclass(frozen=True)
class Subject:
    """One subject's files.  Exactly one of ``image`` and ``volume`` is set.

    ``derive_fov`` is where a FOV mask derived from the image goes, for sets that ship
    none (CHASE_DB1, STARE, Kaggle retina); ``fov`` is the user's own FOV mask.
    """

    id: str
    label: Source
    image: Source | None = None
    volume: VolumeSource | None = None
    fov: Source | None = None
    derive_fov: Path | None = None

    def __post_init__(self) -> None:
        if (self.image is None) == (self.volume is None):
            raise ValueError(f"subject {self.id}: exactly one of image and volume must be set")


def _same(text: str) -> str:
    return text


@dataclass
class _Warnings:
    """The warnings of one ingestion, re-issued naming the user's files, long runs summed up."""

    rename: Callable[[str], str]
    counts: Counter[str] = field(default_factory=Counter)
    last: dict[str, str] = field(default_factory=dict)

    def issue(self, record: logging.LogRecord) -> None:
        kind = str(record.msg)  # the template: one kind of warning, whatever the file
        self.counts[kind] += 1
        message = self.rename(record.getMessage())
        if self.counts[kind] <= WARNINGS_LISTED:
            log.warning("%s", message)
        else:
            self.last[kind] = message

    def summary(self) -> None:
        for kind, n in self.counts.items():
            if n > WARNINGS_LISTED:
                log.warning(
                    "... and %d more file(s) with the same warning, the last: %s", n - WARNINGS_LISTED, self.last[kind]
                )


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _io_warnings() -> Iterator[list[logging.LogRecord]]:
    """Collect what :mod:`vesselseg.imagefiles` warns while reading, instead of letting it through.

    The logger's level is pinned to WARNING meanwhile: whether a file was changed must
    not depend on how verbose the user asked the log to be.
    """
    logger = logging.getLogger(imagefiles.__name__)
    handler = _Capture()
    saved = logger.propagate, logger.level
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.WARNING)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.propagate, level = saved
        logger.setLevel(level)


def _store(arr: np.ndarray, dest: Path) -> None:
    """Write ``arr`` (RGB, grey or bool) to ``dest`` in the format its suffix names."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if dest.suffix.lower() == ".gif":
        Image.fromarray(arr).save(dest)  # OpenCV cannot write GIF; masks only, so no palette loss
        return
    if arr.ndim == 2 and dest.suffix.lower() == ".ppm":
        arr = np.stack([arr] * 3, axis=-1)  # OpenCV writes PPM (STARE) from three channels only
    ok, buf = cv2.imencode(dest.suffix.lower(), np.ascontiguousarray(arr[:, :, ::-1] if arr.ndim == 3 else arr))
    if not ok:
        raise DataError(f"{dest}: could not encode {arr.shape} {arr.dtype} as {dest.suffix}")
    dest.write_bytes(buf.tobytes())


def _keep(src: Path, dest: Path, decoded: np.ndarray, changed: bool) -> None:
    """Copy ``src`` (never link: DVC may make cached files read-only, and the file is the
    user's), or store the decoded pixels when the reader changed them or the copy takes
    another format (a folder's JPEG label is stored as PNG, which keeps it binary).

    A destination in a lossy format (JPEG) of the source's own format cannot hold changed
    pixels exactly: it gets the user's bytes and the prepare stage changes them again.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    suffix = dest.suffix.lower()
    if suffix != src.suffix.lower() or (changed and suffix in _LOSSLESS):
        _store(decoded, dest)
    else:
        shutil.copyfile(src, dest)


class _Reader:
    """Reads the user's files, turning every message into one about the user's file."""

    def __init__(self, rename: Callable[[str], str]) -> None:
        self.rename = rename
        self.warnings = _Warnings(rename)

    @contextlib.contextmanager
    def reading(self) -> Iterator[list[logging.LogRecord]]:
        try:
            with _io_warnings() as records:
                yield records
        except DataError as err:
            raise DataError(self.rename(str(err))) from None
        for record in records:
            self.warnings.issue(record)

    def image(self, src: Source) -> np.ndarray:
        with self.reading() as records:
            arr = imagefiles.read_image(src.path)
            h, w = arr.shape[:2]
            if min(h, w) < MIN_IMAGE_SIDE:
                raise DataError(
                    f"{src.path}: image {w}x{h} is too small (each side must be at least {MIN_IMAGE_SIDE} px to hold "
                    "a training patch); is it a thumbnail?"
                )
        _keep(src.path, src.dest, arr, bool(records))
        return arr

    def volume(self, src: VolumeSource) -> tuple[int, int]:
        """Project the volume (as the prepare stage will) and return the en-face shape."""
        from vesselseg.preprocess.projection import project_volume

        with self.reading():
            enface = project_volume(list(src.slices), method="mean")
            h, w = enface.shape
            if min(h, w) < MIN_IMAGE_SIDE:
                raise DataError(
                    f"{src.slices[0].parent}: volume's en-face map {w}x{h} is too small (each side must be at least "
                    f"{MIN_IMAGE_SIDE} px)"
                )
        src.dest.mkdir(parents=True, exist_ok=True)
        for s in src.slices:
            shutil.copyfile(s, src.dest / s.name)
        return (h, w)

    def mask(self, src: Source, shape: tuple[int, int], what: str) -> np.ndarray:
        with self.reading() as records:
            mask = imagefiles.read_mask(src.path, shape, what)
            if what == "FOV mask" and not mask.any():
                raise DataError(f"{src.path}: FOV mask is empty (no pixel inside the field of view)")
        _keep(src.path, src.dest, mask, bool(records))
        return mask

    def derived_fov(self, image_src: Path, image: np.ndarray, dest: Path) -> None:
        try:
            fov = fov_from_image(image)
        except DataError as err:
            raise DataError(self.rename(f"{image_src}: {err}")) from None
        _store(fov, dest)


def ingest(subjects: Sequence[Subject], desc: str, rename: Callable[[str], str] = _same) -> None:
    """Check and copy every subject's files, in order, stopping at the first bad one.

    ``rename`` turns a path as read into the name the user knows, in messages: for an
    archive's extracted member, ``<archive>:<member>`` (see
    :class:`vesselseg.data.adapters.Unpacked`).  Raises :class:`DataError` naming the
    file and what is wrong; the caller is inside ``building`` so nothing is swapped in.
    """
    reader = _Reader(rename)
    for s in tqdm(subjects, desc=desc, unit="subject", disable=None, leave=False):
        if s.image is not None:
            image = reader.image(s.image)
            shape = image.shape[:2]
        else:
            assert s.volume is not None
            image = None
            shape = reader.volume(s.volume)
        reader.mask(s.label, shape, "label")
        if s.fov is not None:
            reader.mask(s.fov, shape, "FOV mask")
        if s.derive_fov is not None:
            if image is None or s.image is None:
                raise ValueError(f"subject {s.id}: a FOV is derived from an image, not a volume")
            reader.derived_fov(s.image.path, image, s.derive_fov)
    reader.warnings.summary()
