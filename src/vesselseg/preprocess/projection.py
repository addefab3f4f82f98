"""Project an OCTA volume along depth into an en-face map, one B-scan at a time.

Convention (OCTA-500, as the IPN-V2 loader reads it): slice ``k`` of a volume is a
B-scan image of shape (depth, width); the en-face map has shape (width, n_bscans) and
its column ``j`` is B-scan ``j`` reduced over depth rows ``[start, stop)``.

Why our own BMP reader: OCTA-500 volumes are 400 files of 8-bit, uncompressed,
grey-palette BMP per subject, and a projection touches every byte of every slice.
For such files the pixel data is a plain array after a fixed header, so parsing the
header with ``struct`` and reading the rows straight into a reused numpy buffer skips
the decoder's allocation and copy, and a slab projection reads only the slab's rows.
Anything else (compressed or colour BMP, PNG, TIFF, a non-grey palette) goes through
OpenCV (tifffile for TIFF), as :mod:`vesselseg.imagefiles` does.  ``benchmarks/
bench_projection.py`` measures both against PIL and a naive stack-then-reduce loop.

Memory: the output plus one slice buffer per worker; the volume is never stacked.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import cv2
import numpy as np
import tifffile
from tqdm import tqdm

from vesselseg.errors import DataError, ParamsError

log = logging.getLogger(__name__)

__all__ = [
    "METHODS",
    "BmpLayout",
    "Rows",
    "SlabError",
    "SliceReader",
    "parse_bmp_header",
    "project_array",
    "project_volume",
    "read_slice",
]

Method = Literal["mean", "max", "min"]
METHODS: tuple[str, ...] = ("mean", "max", "min")

_HEAD_BYTES = 14 + 124 + 4 * 256  # file header + largest info header (V5) + full palette
_INFO_SIZES = (40, 52, 56, 108, 124)  # BITMAPINFOHEADER and its V2..V5 extensions
_IDENTITY = np.arange(256, dtype=np.uint8)
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_BINARY", 0)  # looked up once: a missing attribute is slow to probe


class SlabError(ParamsError, DataError):
    """A slab that does not fit the volume: a param (``prepare.slab``) at odds with the data.

    It is both a :class:`ParamsError` and a :class:`DataError` so callers catching
    either see it; the message names the param and the file.
    """


class Rows(NamedTuple):
    """Rows read from one B-scan.

    ``data`` is C-contiguous (rows, span) with span >= ``width``: BMP rows keep their
    4-byte padding so reductions can run over one flat block; ``pixels`` drops it.  It
    may be a view into the reader's reused buffer, valid until its next read.  Rows of
    a bottom-up BMP come in file order (``reversed``): a projection only reduces over
    them, which does not depend on their order.
    """

    data: np.ndarray
    width: int
    depth: int
    reversed: bool

    @property
    def pixels(self) -> np.ndarray:
        return self.data[:, : self.width]


@dataclass(frozen=True)
class BmpLayout:
    """Where the pixels of a plain 8-bit BMP are, and how to turn indices into grey.

    ``lut`` is ``None`` when the palette is the identity grey ramp (index = value).
    """

    height: int
    width: int
    stride: int
    offset: int
    bottom_up: bool
    lut: np.ndarray | None


def parse_bmp_header(head: bytes | memoryview) -> BmpLayout | None:
    """Parse the start of a BMP; ``None`` if it is not uncompressed 8-bit grey-palette.

    ``None`` means "use a general decoder", not "broken": 24-bit, RLE or colour-palette
    files are valid BMPs we simply do not fast-path.
    """
    if len(head) < 54 or bytes(head[:2]) != b"BM":
        return None
    offset, info_size = struct.unpack_from("<II", head, 10)
    if info_size not in _INFO_SIZES:
        return None
    width, height, planes, bits, compression = struct.unpack_from("<iiHHI", head, 18)
    n_colours = struct.unpack_from("<I", head, 46)[0] or 256
    if planes != 1 or bits != 8 or compression != 0 or width <= 0 or height == 0 or n_colours > 256:
        return None
    pal_start = 14 + info_size
    pal_end = pal_start + 4 * n_colours
    if pal_end > len(head) or offset < pal_end:
        return None
    palette = np.frombuffer(head, dtype=np.uint8, count=4 * n_colours, offset=pal_start).reshape(-1, 4)
    b, g, r = palette[:, 0], palette[:, 1], palette[:, 2]
    if not (np.array_equal(b, g) and np.array_equal(g, r)):
        return None
    if np.array_equal(b, _IDENTITY[:n_colours]):
        lut = None
    else:
        lut = np.zeros(256, dtype=np.uint8)
        lut[:n_colours] = b
    stride = (width + 3) // 4 * 4  # rows are padded to 4 bytes
    return BmpLayout(abs(height), width, stride, offset, height > 0, lut)


def _decode_general(path: Path) -> np.ndarray:
    """Any other slice format, as a 2D array (grey; colour is converted to luminance)."""
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            arr = tifffile.imread(path)
        except Exception as err:  # tifffile raises many types for corrupt files
            raise DataError(f"{path}: not a readable TIFF slice ({type(err).__name__})") from None
        if arr.ndim == 3 and arr.shape[2] in (3, 4):
            arr = (
                cv2.cvtColor(arr[:, :, :3], cv2.COLOR_RGB2GRAY)
                if arr.dtype in (np.uint8, np.uint16, np.float32)
                else arr[:, :, :3].mean(axis=2)
            )
    else:
        try:
            data = np.fromfile(path, dtype=np.uint8)
        except OSError as err:
            raise DataError(f"{path}: cannot read B-scan ({err.strerror})") from None
        decoded = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
        if decoded is None:
            raise DataError(f"{path}: not a readable image (unknown format or truncated file)")
        arr = decoded
        if arr.ndim == 3:
            arr = cv2.cvtColor(arr, cv2.COLOR_BGRA2GRAY if arr.shape[2] == 4 else cv2.COLOR_BGR2GRAY)
    if arr.ndim != 2:
        raise DataError(f"{path}: a B-scan must be a 2D image, got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise DataError(f"{path}: B-scan holds NaN or Inf values")
    return arr


class SliceReader:
    """Reads depth rows ``[start, stop)`` of B-scans into one reused buffer.

    One reader per thread.  Plain 8-bit grey BMPs take the fast path (header parsed
    once per distinct header, rows read straight into the buffer); other files go
    through OpenCV/tifffile.  The benchmark uses it as the read-and-decode baseline.

    Not ``mmap``: mapping each file and reducing the mapped pages in place was tried
    and measured slower here (1.45x the read-and-decode time against 1.17x for reading
    into the reused buffer; the page faults and unmaps cost more than the copy saves).
    """

    def __init__(self) -> None:
        self._buf = np.empty(0, dtype=np.uint8)
        self._head = bytearray(_HEAD_BYTES)
        self._last_key = b""
        self._last_layout: BmpLayout | None = None

    def _layout(self, n_head: int) -> BmpLayout | None:
        # Every slice of a volume normally has the same header and palette (the bytes
        # before the pixel offset): compare them instead of parsing them again.  The
        # bytearray comparison is a memcmp; a memoryview's compares byte by byte (10x
        # slower, measured).
        key = self._last_key
        if key and n_head >= len(key) and self._head.startswith(key):
            return self._last_layout
        head = memoryview(self._head)[:n_head]
        layout = parse_bmp_header(head)
        self._last_key = bytes(head[: layout.offset]) if layout is not None else b""
        self._last_layout = layout
        return layout

    def read(self, path: Path, rows: tuple[int, int] | None) -> Rows:
        """Read depth rows ``rows`` (``[start, stop)``, all if None) of one B-scan.

        Rows outside the slice give an empty block (the caller reports the size).
        Plain BMPs cost two or three system calls on one descriptor (header, size,
        rows); no file object is built.
        """
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except OSError as err:
            raise DataError(f"{path}: cannot open B-scan ({err.strerror})") from None
        try:
            n_head = os.readv(fd, [self._head])
            layout = self._layout(n_head)
            if layout is None:
                arr = _decode_general(path)
                depth, width = int(arr.shape[0]), int(arr.shape[1])
                part = arr if rows is None else arr[rows[0] : rows[1]]
                return Rows(np.ascontiguousarray(part), width, depth, False)
            need = layout.offset + layout.stride * layout.height
            size = os.fstat(fd).st_size
            if size < need:
                raise DataError(f"{path}: truncated BMP ({size} bytes, its header promises {need})")
            a, b = (0, layout.height) if rows is None else rows
            if not 0 <= a < b <= layout.height:
                return Rows(np.empty((0, layout.stride), dtype=np.uint8), layout.width, layout.height, False)
            first = layout.height - b if layout.bottom_up else a
            n = (b - a) * layout.stride
            if self._buf.size < n:
                self._buf = np.empty(n, dtype=np.uint8)
            if os.preadv(fd, [self._buf.data[:n]], layout.offset + first * layout.stride) != n:
                raise DataError(f"{path}: truncated BMP (pixel rows end early)")
        finally:
            os.close(fd)
        data: np.ndarray = self._buf[:n].reshape(b - a, layout.stride)
        if layout.lut is not None:
            data = cv2.LUT(data, layout.lut)
        return Rows(data, layout.width, layout.height, layout.bottom_up)


def read_slice(path: Path | str, reader: SliceReader | None = None) -> np.ndarray:
    """Decode one B-scan as a (depth, width) image, top row first, contiguous.

    Pass a ``reader`` to reuse its buffer over many slices (the benchmark's read-and-
    decode baseline does).  The projection itself skips the flip and the copy.
    """
    got = (reader or SliceReader()).read(Path(path), None)
    pixels = got.pixels
    return np.ascontiguousarray(pixels[::-1] if got.reversed else pixels)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ParamsError(f"prepare.projection: unknown method {method!r}; choose one of {', '.join(METHODS)}")


def _check_slab(slab: tuple[int, int] | None, depth: int, where: str) -> tuple[int, int]:
    if slab is None:
        return 0, depth
    try:
        a, b = int(slab[0]), int(slab[1])
    except (TypeError, ValueError, IndexError):
        raise ParamsError(f"prepare.slab: expected [start, stop] integers or null, got {slab!r}") from None
    if not 0 <= a < b:
        raise ParamsError(f"prepare.slab: slab [{a}, {b}) must satisfy 0 <= start < stop")
    if b > depth:
        raise SlabError(f"prepare.slab: slab [{a}, {b}) is outside the volume depth {depth} ({where})")
    return a, b


def _fold_reduce(data: np.ndarray, ufunc: np.ufunc, k: int = 16) -> np.ndarray:
    """``ufunc.reduce(data, axis=0)`` for a C-contiguous (rows, span) block, in two levels.

    numpy reduces axis 0 one row at a time (one inner-loop call per 400-byte row);
    first reducing ``k`` long stripes of ``rows // k`` rows each runs the inner loop on
    long runs instead.  Measured 1.3-2x faster on 640 x 400 B-scans; same result,
    since max/min are associative and commutative.
    """
    rows, span = data.shape
    m = rows // k
    if m < 2:
        return ufunc.reduce(data, axis=0)
    out = ufunc.reduce(data[: k * m].reshape(k, m * span), axis=0).reshape(m, span)
    out = ufunc.reduce(out, axis=0)
    if rows > k * m:
        ufunc(out, ufunc.reduce(data[k * m :], axis=0), out=out)
    return out


_CV_LOCK = threading.Lock()
_cv_users = 0
_cv_saved = 0


@contextlib.contextmanager
def _opencv_one_thread() -> Iterator[None]:
    """Run OpenCV calls single-threaded for the duration of a projection.

    Why: ``cv2.reduce`` hands each 640 x 400 B-scan to OpenCV's thread pool; waking a
    worker per slice costs more than the split saves, and on a busy 2-core machine it
    doubled the reduction time (54 vs 102 us a slice, measured).  Our parallelism is
    across slices (``workers``).  OpenCV's thread count is process-wide, so the first
    projection to enter saves it and the last to leave restores it (a counter under a
    lock keeps concurrent projections from restoring too early).
    """
    global _cv_users, _cv_saved
    with _CV_LOCK:
        if _cv_users == 0:
            _cv_saved = cv2.getNumThreads()
            cv2.setNumThreads(1)
        _cv_users += 1
    try:
        yield
    finally:
        with _CV_LOCK:
            _cv_users -= 1
            if _cv_users == 0:
                cv2.setNumThreads(_cv_saved)


def _reduce(got: Rows, method: str) -> np.ndarray:
    """Reduce the rows of a block over depth, to (width,); the mean comes back as a sum.

    Sums of 8-bit rows use ``cv2.reduce`` into int32 (exact up to 8M rows), run on one
    OpenCV thread (see :func:`_opencv_one_thread`).  Measured per 640 x 400 slice on this
    2-core machine (median, us): cv2.reduce 1 thread 54, cv2.reduce 2 threads 102,
    two-level ``np.add.reduce`` into uint16 then int32 150, ``ones @ rows.astype(float32)``
    165, ``np.add.reduce(dtype=uint32)`` 300 (its casting loop dominates), SWAR on a
    uint64 view 440; for scale, a plain copy of the slice costs 23-30.
    """
    data = got.data
    if method == "mean":
        if data.dtype == np.uint8:
            return cv2.reduce(got.pixels, 0, cv2.REDUCE_SUM, dtype=cv2.CV_32S).ravel()
        return np.add.reduce(got.pixels, axis=0, dtype=np.float64)
    return _fold_reduce(data, np.maximum if method == "max" else np.minimum)[: got.width]


def project_volume(
    slices: Sequence[Path | str],
    *,
    method: Method,
    slab: tuple[int, int] | None = None,
    workers: int = 1,
    progress: bool | None = False,
) -> np.ndarray:
    """Project B-scan files (in the order given: B-scan j is ``slices[j]``) to float32 (width, n_bscans).

    ``slab`` is ``[start, stop)`` in depth rows (top row 0), ``None`` for the full
    depth.  ``workers`` > 1 decodes and reduces slices in a thread pool (file reads and
    numpy reductions release the GIL); each worker holds one slice buffer.  Every slice
    must have the size of the first; a bad slice raises :class:`DataError` naming it.
    Callers sort the files (``vesselseg.imagefiles.list_slices`` sorts naturally).
    """
    _check_method(method)
    paths = [Path(p) for p in slices]
    if not paths:
        raise DataError("project_volume: no B-scan files given (empty volume folder?)")
    if workers < 1:
        raise ParamsError(f"workers must be >= 1, got {workers}")

    with _opencv_one_thread():
        return _project_files(paths, method, slab, workers, progress)


def _project_files(
    paths: list[Path], method: str, slab: tuple[int, int] | None, workers: int, progress: bool | None
) -> np.ndarray:
    reader = SliceReader()
    # The first slice fixes the size and lets us check the slab before reading the rest
    # (a one-row read: the header is all we need from it here).
    head = reader.read(paths[0], (0, 1))
    depth, width = head.depth, head.width
    rows = _check_slab(slab, depth, str(paths[0]))
    n_rows = rows[1] - rows[0]

    first = reader.read(paths[0], rows)
    first_dtype = first.data.dtype
    first_red = _reduce(first, method)
    # (n_bscans, width), filled row by row: row j becomes column j of the output.
    acc = np.empty((len(paths), width), dtype=first_red.dtype)
    acc[0] = first_red

    def do(index: int, rdr: SliceReader) -> None:
        path = paths[index]
        got = rdr.read(path, rows)
        if (got.depth, got.width) != (depth, width):
            raise DataError(
                f"{path}: B-scan is {got.width}x{got.depth} (width x depth) but {paths[0].name} is "
                f"{width}x{depth}; all slices of a volume must have one size"
            )
        if got.data.dtype != first_dtype:
            raise DataError(
                f"{path}: B-scan pixels are {got.data.dtype} but {paths[0].name} has {first_dtype}; mixed bit depths in one volume"
            )
        acc[index] = _reduce(got, method)

    bar = tqdm(
        total=len(paths), desc="project", unit="B-scan", disable=None if progress is None else not progress, leave=False
    )
    with bar:
        bar.update(1)
        if workers == 1 or len(paths) < 4:
            for i in range(1, len(paths)):
                do(i, reader)
                bar.update(1)
        else:
            chunks = np.array_split(np.arange(1, len(paths)), workers)

            def run(chunk: np.ndarray) -> None:
                rdr = SliceReader()
                for i in chunk.tolist():
                    do(i, rdr)
                    bar.update(1)

            with ThreadPoolExecutor(max_workers=workers) as pool:
                for fut in [pool.submit(run, c) for c in chunks]:
                    fut.result()
    if method == "mean":
        return np.ascontiguousarray((acc.T / n_rows).astype(np.float32))
    return np.ascontiguousarray(acc.T, dtype=np.float32)


def project_array(volume: np.ndarray, *, method: Method, slab: tuple[int, int] | None = None) -> np.ndarray:
    """Project an in-memory volume ``(n_bscans, depth, width)`` to float32 ``(width, n_bscans)``."""
    _check_method(method)
    vol = np.asarray(volume)
    if vol.ndim != 3 or min(vol.shape) < 1:
        raise DataError(f"volume must be (n_bscans, depth, width), got shape {vol.shape}")
    if not (np.issubdtype(vol.dtype, np.integer) or np.issubdtype(vol.dtype, np.floating) or vol.dtype == bool):
        raise DataError(f"volume has unsupported dtype {vol.dtype}")
    a, b = _check_slab(slab, vol.shape[1], f"in-memory volume of shape {vol.shape}")
    part = vol[:, a:b, :]
    if np.issubdtype(vol.dtype, np.floating) and not np.isfinite(part).all():
        raise DataError(f"volume holds NaN or Inf values in depth rows [{a}, {b})")
    if method == "mean":
        red = part.mean(axis=1, dtype=np.float64)
    elif method == "max":
        red = part.max(axis=1)
    else:
        red = part.min(axis=1)
    return np.ascontiguousarray(red.T, dtype=np.float32)
