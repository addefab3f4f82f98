"""Qualitative figures: a four-panel overlay per image, composited with numpy.

Plain numpy (plus OpenCV's built-in Hershey font for the captions) instead of
matplotlib: no font files, no backend, a few milliseconds per image, and the same
bytes on every run, so DVC does not see a changed output when nothing changed.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["COLORS", "overlay"]

#: Error-map colours (RGB).  Magenta/green stays distinguishable for the common
#: red-green colour blindness, unlike red/green.
COLORS: dict[str, tuple[int, int, int]] = {
    "TP": (255, 255, 255),
    "FP": (255, 0, 255),
    "FN": (0, 200, 0),
    "TN": (0, 0, 0),
}
_OUTSIDE_GAIN = 0.35  # brightness kept outside the FOV, where pixels are not scored
_GAP = 4  # pixels between panels
_CAPTION_H = 18
_LEGEND_H = 18


def _to_rgb(img: np.ndarray) -> np.ndarray:
    if img.ndim == 2:
        return np.repeat(img[:, :, None], 3, axis=2)
    return img


def _grey_to_uint8(values: np.ndarray) -> np.ndarray:
    """Map [0, 1] floats or bools to uint8 grey."""
    return np.clip(np.rint(np.asarray(values, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


def _text(canvas: np.ndarray, text: str, x: int, y: int, color: tuple[int, int, int] = (255, 255, 255)) -> None:
    cv2.putText(canvas, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, 0.4, color, 1, cv2.LINE_AA)


def _error_map(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    out = np.zeros((*pred.shape, 3), dtype=np.uint8)
    out[pred & target] = COLORS["TP"]
    out[pred & ~target] = COLORS["FP"]
    out[~pred & target] = COLORS["FN"]
    return out


def overlay(
    image: np.ndarray,
    pred: np.ndarray,
    target: np.ndarray,
    fov: np.ndarray | None = None,
    *,
    probs: np.ndarray | None = None,
    captions: bool = True,
) -> np.ndarray:
    """Side-by-side panels: input | probability (or prediction) | ground truth | errors.

    Colour legend of the error panel: TP white, FP magenta, FN green, TN black.
    Outside the field of view every panel is dimmed to 35 % brightness, because those
    pixels are not scored.  With ``captions`` each panel gets a title bar and a
    legend strip of colour swatches is added below (cv2's built-in font, no files).
    ``probs`` (float (H, W) in [0, 1]) shows the soft output in the second panel;
    without it the binary prediction is shown.

    Returns uint8 RGB of shape (H [+ caption + legend], 4 W + 3 gaps, 3).
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"image must be uint8 (H, W) or (H, W, 3), got {image.dtype} {image.shape}")
    shape = image.shape[:2]
    for name, arr in (("pred", pred), ("target", target), ("fov", fov), ("probs", probs)):
        if arr is not None and np.asarray(arr).shape != shape:
            raise ValueError(f"{name} shape {np.asarray(arr).shape} differs from image shape {shape}")
    pred = np.asarray(pred, dtype=bool)
    target = np.asarray(target, dtype=bool)
    fov = np.ones(shape, dtype=bool) if fov is None else np.asarray(fov, dtype=bool)

    second = _grey_to_uint8(probs if probs is not None else pred)
    panels = [_to_rgb(image), _to_rgb(second), _to_rgb(_grey_to_uint8(target)), _error_map(pred, target)]
    h, w = shape
    width = 4 * w + 3 * _GAP
    top = _CAPTION_H if captions else 0
    bottom = _LEGEND_H if captions else 0
    canvas = np.full((top + h + bottom, width, 3), 48, dtype=np.uint8)
    outside = ~fov
    for k, panel in enumerate(panels):
        panel = panel.copy()
        panel[outside] = (panel[outside] * _OUTSIDE_GAIN).astype(np.uint8)
        x0 = k * (w + _GAP)
        canvas[top : top + h, x0 : x0 + w] = panel
    if captions:
        titles = ("input", "probability" if probs is not None else "prediction", "ground truth", "errors")
        for k, title in enumerate(titles):
            _text(canvas, title, k * (w + _GAP) + 3, top - 5)
        x = 3
        for name in ("TP", "FP", "FN"):
            y0 = top + h + 4
            canvas[y0 : y0 + 10, x : x + 10] = COLORS[name]
            _text(canvas, name, x + 13, y0 + 9)
            x += 45
    return canvas
