"""Field-of-view masks for fundus sets that ship none (CHASE_DB1, STARE).

A fundus camera records a bright disc on a near-black background; the red channel
is the brightest inside the disc and the least affected by vessels, so thresholding
it separates the two well.  Closing bridges dark gaps at the rim, keeping the largest
component drops text and specks outside the disc, and filling holes restores dark
lesions inside it.  This is the usual recipe (e.g. STARE masks in the literature are
made this way); it is written here because no library ships it as one call, each step
is one OpenCV/SciPy call.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np
from scipy import ndimage

from vesselseg.errors import DataError

log = logging.getLogger(__name__)


def fov_from_image(
    image: np.ndarray,
    *,
    rel_threshold: float = 0.1,
    closing_radius: int = 5,
    erode_radius: int = 0,
) -> np.ndarray:
    """Return a bool (H, W) FOV mask for a uint8 fundus image, grey or RGB.

    ``rel_threshold`` is a fraction of the red channel's 99.5th percentile, so the
    rule holds across cameras with different exposure; ``erode_radius`` trims the
    rim, where some evaluations exclude the bright border ring.
    """
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise DataError(f"fov_from_image: expected uint8 (H, W) or (H, W, 3), got {image.dtype} {image.shape}")
    if not 0.0 < rel_threshold < 1.0:
        raise ValueError(f"rel_threshold must be in (0, 1), got {rel_threshold}")
    red = image[:, :, 0] if image.ndim == 3 else image
    top = float(np.percentile(red, 99.5))
    if top <= 0:
        raise DataError("fov_from_image: image is black; cannot find a field of view")
    mask: np.ndarray = (red > rel_threshold * top).astype(np.uint8)
    if closing_radius > 0:
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * closing_radius + 1, 2 * closing_radius + 1))
        # Pad so the closing does not glue the disc to the image border.
        pad = closing_radius + 1
        mask = cv2.morphologyEx(
            cv2.copyMakeBorder(mask, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0), cv2.MORPH_CLOSE, k
        )
        mask = mask[pad:-pad, pad:-pad]
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        raise DataError("fov_from_image: no bright region found; cannot find a field of view")
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    fov = ndimage.binary_fill_holes(labels == largest)
    if erode_radius > 0:
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * erode_radius + 1, 2 * erode_radius + 1))
        fov = cv2.erode(fov.astype(np.uint8), k).astype(bool)
    return np.asarray(fov, dtype=bool)
