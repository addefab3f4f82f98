"""Channel choice, contrast equalization and gamma for the prepare stage.

The usual retinal-vessel recipe (green channel, CLAHE, gamma) with OpenCV's kernels.
Conventions, fixed here once:

- colour images are RGB (``vesselseg.imagefiles``'s convention), never BGR;
- colour equalization works on the L channel of CIE L*a*b*, so hue is kept;
- gamma follows the retinal-vessel literature (e.g. the retina-unet preprocessing):
  ``out = 255 * (in / 255) ** (1 / gamma)``, so ``gamma > 1`` brightens the dark
  vessels' surroundings and ``gamma = 1`` is the identity.
"""

from __future__ import annotations

import logging
from typing import Literal

import cv2
import numpy as np

from vesselseg.errors import DataError, ParamsError

log = logging.getLogger(__name__)

__all__ = [
    "CHANNELS",
    "EQUALIZE_METHODS",
    "equalize",
    "equalize_hist_masked",
    "gamma_lut",
    "select_channel",
    "to_uint8_projection",
]

Channel = Literal["green", "grey", "rgb"]
EqualizeMethod = Literal["none", "global", "clahe"]
CHANNELS: tuple[str, ...] = ("green", "grey", "rgb")
EQUALIZE_METHODS: tuple[str, ...] = ("none", "global", "clahe")


def _check_image(image: np.ndarray, what: str = "image") -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise DataError(f"{what} must be uint8, got {arr.dtype}")
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)) or min(arr.shape[:2]) < 1:
        raise DataError(f"{what} must be (H, W) grey or (H, W, 3) RGB, got shape {arr.shape}")
    return arr


def select_channel(image: np.ndarray, channel: Channel) -> np.ndarray:
    """Pick what the network sees from a colour image; grey images pass through unchanged.

    ``green`` is the standard choice for fundus images (best vessel contrast: haemoglobin
    absorbs green most); ``grey`` is ITU-R BT.601 luminance (``cv2.COLOR_RGB2GRAY``);
    ``rgb`` keeps all three channels.
    """
    if channel not in CHANNELS:
        raise ParamsError(f"prepare.channel: unknown channel {channel!r}; choose one of {', '.join(CHANNELS)}")
    arr = _check_image(image)
    if arr.ndim == 2 or channel == "rgb":
        return arr
    if channel == "green":
        return np.ascontiguousarray(arr[:, :, 1])
    return cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY)


def equalize_hist_masked(grey: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Histogram equalization with the histogram taken over ``mask`` only.

    Why our own: ``cv2.equalizeHist`` has no mask, and in a fundus image the black
    surround (a third of the pixels) takes up the bottom of the CDF, which pushes the
    darkest FOV pixels (the vessels) up to mid-grey and wastes the output range.  The
    LUT is cv2's formula exactly (first occupied level -> 0, then
    ``round(255 * (cdf - cdf0) / (n - cdf0))`` in float32), so with a full mask the
    result equals ``cv2.equalizeHist``.  Pixels outside the mask are left unchanged.
    """
    m = np.asarray(mask, dtype=bool)
    values = grey[m]
    if values.size == 0:
        return grey.copy()
    hist = np.bincount(values, minlength=256)
    first = int(np.flatnonzero(hist)[0])
    total = int(values.size)
    lut = np.zeros(256, dtype=np.uint8)
    if hist[first] == total:
        lut[:] = first  # a constant region: cv2 maps it to its own value
    else:
        scale = np.float32(255.0 / (total - hist[first]))
        cdf = np.cumsum(hist) - hist[first]
        lut[first:] = np.clip(np.rint(cdf[first:].astype(np.float32) * scale), 0, 255).astype(np.uint8)
    out = grey.copy()
    out[m] = lut[values]
    return out


def gamma_lut(gamma: float) -> np.ndarray:
    """uint8 LUT of ``round(255 * (i / 255) ** (1 / gamma))``; the identity at gamma = 1."""
    if not gamma > 0:
        raise ParamsError(f"prepare.gamma must be > 0, got {gamma}")
    i = np.arange(256, dtype=np.float64)
    return np.clip(np.rint(255.0 * (i / 255.0) ** (1.0 / gamma)), 0, 255).astype(np.uint8)


def _equalize_grey(grey: np.ndarray, method: str, clip: float, tile: int, mask: np.ndarray | None) -> np.ndarray:
    if method == "none":
        return grey
    if method == "global":
        return cv2.equalizeHist(grey) if mask is None else equalize_hist_masked(grey, mask)
    # CLAHE has no mask: its tiles see the whole image.  Outside-FOV pixels are put
    # back afterwards so the black surround stays black (it is never scored anyway).
    out = cv2.createCLAHE(clipLimit=float(clip), tileGridSize=(int(tile), int(tile))).apply(grey)
    if mask is not None:
        out = np.where(mask, out, grey)
    return out


def equalize(
    image: np.ndarray,
    *,
    method: EqualizeMethod,
    clahe_clip: float = 2.0,
    clahe_tile: int = 8,
    gamma: float = 1.0,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Equalize contrast (``none`` | ``global`` | ``clahe``), then apply gamma; returns uint8.

    Grey images are processed directly; RGB images on the L channel of L*a*b* (hue and
    saturation kept), then gamma on each RGB channel.  ``mask`` (bool, the FOV) makes the
    ``global`` histogram count FOV pixels only; see :func:`equalize_hist_masked`.
    ``method="none"`` with ``gamma=1`` returns an unchanged copy.
    """
    if method not in EQUALIZE_METHODS:
        raise ParamsError(f"prepare.equalize: unknown method {method!r}; choose one of {', '.join(EQUALIZE_METHODS)}")
    if not clahe_clip > 0:
        raise ParamsError(f"prepare.clahe_clip must be > 0, got {clahe_clip}")
    if int(clahe_tile) < 1:
        raise ParamsError(f"prepare.clahe_tile must be >= 1, got {clahe_tile}")
    lut = gamma_lut(gamma)
    arr = _check_image(image)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != arr.shape[:2]:
            raise DataError(f"mask shape {mask.shape} differs from image shape {arr.shape[:2]}")
        mask = mask.astype(bool)
    if arr.ndim == 2:
        out = _equalize_grey(arr, method, clahe_clip, clahe_tile, mask)
    elif method == "none":
        out = arr
    else:
        lab = cv2.cvtColor(arr, cv2.COLOR_RGB2LAB)
        lab[:, :, 0] = _equalize_grey(np.ascontiguousarray(lab[:, :, 0]), method, clahe_clip, clahe_tile, mask)
        out = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
    if gamma != 1.0:
        out = cv2.LUT(out, lut)
    return out.copy() if out is arr else out


def to_uint8_projection(proj: np.ndarray) -> np.ndarray:
    """Scale a float projection to uint8 0..255 by its own min and max.

    Per image, because a projection's absolute level depends on the slab, the
    reduction and the device's gain, none of which carries meaning for segmentation;
    equalization follows anyway.  A constant map becomes all zeros.  NaN/Inf are
    refused (they would make min/max meaningless).
    """
    arr = np.asarray(proj)
    if arr.ndim != 2 or min(arr.shape, default=0) < 1:
        raise DataError(f"projection must be a non-empty 2D array, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise DataError(f"projection has unsupported dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise DataError("projection holds NaN or Inf values")
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.clip(np.rint((arr - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
