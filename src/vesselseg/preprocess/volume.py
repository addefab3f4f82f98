"""B-scan files -> one model-ready OCTA volume for the IPN, one B-scan at a time.

Layout of the result: ``uint8 (depth, width, n_bscans)``, i.e. ``volume[:, x, j]`` is
A-scan ``x`` of B-scan ``j``.  The two last axes are exactly the en-face axes of the
2D projection (:mod:`vesselseg.preprocess.projection`: rows = lateral x, columns =
B-scan index, as OCTA-500 orients its labels), so ``volume.mean(axis=0)`` lines up
pixel for pixel with the prepared image, label and FOV; depth comes first so that a
sliding window over the en-face plane sees depth as channels.

Depth handling: the rows ``prepare.slab`` (the same slab the projection uses; all
rows when ``None``) are cut out, then resized along depth only to ``depth`` rows,
so volumes of any scanner depth become one network input depth:

* shrinking uses area interpolation (``cv2.INTER_AREA``): each output row is the
  mean of the input rows it covers (fractional rows weighted by their overlap),
  which keeps thin bright vessels' flow signal instead of skipping rows as
  nearest/linear sampling would;
* enlarging uses linear interpolation (``cv2.INTER_LINEAR``, half-pixel centres),
  because area "enlarging" in OpenCV degenerates to nearest-neighbour copies.

The lateral axis is never resampled (scale 1 is the identity for both methods).
Resizing runs in float32 and is rounded once at the end, so the result does not
depend on OpenCV's fixed-point uint8 paths.

Memory: the uint8 output plus one B-scan buffer (the projection's reused reader
buffer and one float32 copy of the slab); the full-depth volume is never stacked.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from vesselseg.errors import DataError, ParamsError
from vesselseg.preprocess.projection import SliceReader, _check_slab

log = logging.getLogger(__name__)

__all__ = ["load_volume", "resize_depth"]


def resize_depth(rows: np.ndarray, depth: int) -> np.ndarray:
    """Resize a (rows, width) block to float32 (depth, width) along the first axis only.

    Area interpolation when shrinking, linear when enlarging (see the module
    docstring); an equal size is returned unchanged (as float32).
    """
    block = np.asarray(rows, dtype=np.float32)
    n, width = block.shape
    if n == depth:
        return block
    method = cv2.INTER_AREA if depth < n else cv2.INTER_LINEAR
    out = cv2.resize(block, (width, depth), interpolation=method)
    # cv2 drops a trailing axis of length 1 for single-column inputs: keep 2D
    return out.reshape(depth, width)


def load_volume(
    slices: Sequence[Path | str],
    *,
    depth: int,
    slab: tuple[int, int] | None,
    progress: bool | None = False,
) -> np.ndarray:
    """Read B-scans (B-scan j is ``slices[j]``) into uint8 ``(depth, width, n_bscans)``.

    ``slab`` is ``[start, stop)`` in depth rows of the original B-scans (top row 0),
    ``None`` for the full depth; ``depth`` is the output depth after resizing.
    Every slice must have the size of the first and 8-bit pixels: a bad slice raises
    :class:`DataError` naming the file; a slab outside the volume raises
    :class:`ParamsError` naming ``prepare.slab``.
    """
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 1:
        raise ParamsError(f"prepare.volume_depth must be an integer >= 1, got {depth!r}")
    depth = int(depth)
    paths = [Path(p) for p in slices]
    if not paths:
        raise DataError("load_volume: no B-scan files given (empty volume folder?)")

    reader = SliceReader()
    head = reader.read(paths[0], (0, 1))  # one row: the header fixes the size and checks the slab
    full_depth, width = head.depth, head.width
    rows = _check_slab(slab, full_depth, str(paths[0]))

    out = np.empty((depth, width, len(paths)), dtype=np.uint8)
    bar = tqdm(paths, desc="volume", unit="B-scan", disable=None if progress is None else not progress, leave=False)
    for j, path in enumerate(bar):
        got = reader.read(path, rows)
        if (got.depth, got.width) != (full_depth, width):
            raise DataError(
                f"{path}: B-scan is {got.width}x{got.depth} (width x depth) but {paths[0].name} is "
                f"{width}x{full_depth}; all slices of a volume must have one size"
            )
        if got.data.dtype != np.uint8:
            raise DataError(
                f"{path}: B-scan pixels are {got.data.dtype}; prepare.volumes needs 8-bit B-scans "
                "(the kept volumes are uint8)"
            )
        pixels = got.pixels
        if got.reversed:  # bottom-up BMP rows arrive in file order: put the top row first
            pixels = pixels[::-1]
        resized = resize_depth(pixels, depth)
        out[:, :, j] = np.clip(np.rint(resized), 0, 255).astype(np.uint8)
    return out
