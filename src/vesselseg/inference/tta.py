"""Test-time augmentation: average a predictor's probabilities over flips and rotations.

Vessels have no preferred orientation, so a net's errors under a flip or a 90-degree
rotation of its input are partly independent; mapping each output back and
averaging the probabilities removes part of them at the cost of one forward pass
per transform.  This module only sees arrays and a callable (as the stitching core
only sees tensors): the predictor decides how an image is turned into probabilities
(whole image or sliding windows, any device), TTA only transforms its input and
output.

Modes (:data:`TTA_MODES`):

- ``none``: one pass, the predictor's output unchanged;
- ``flips``: identity, horizontal, vertical and both flips (= rotation by 180°): 4 passes;
- ``d4``: the 8 symmetries of the square (4 rotations by 90°, each with and without
  a horizontal flip): 8 passes.  A rotation by 90° of an (H, W) image is (W, H);
  the predictor returns the shape of its input, so the inverse rotation brings the
  output back to (H, W).

Written here rather than taken from a library: ttach and MONAI's TTA work on
tensors of a torch model, while this wraps any ``numpy -> numpy`` predictor
(including the classical baselines) in a dozen lines of ``np.flip``/``np.rot90``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["TTA_MODES", "predict_with_tta", "transforms"]

TTA_MODES = ("none", "flips", "d4")

# A transform is (k, flip): rotate by k x 90° counter-clockwise, after flipping the
# columns (left-right) when ``flip``.  Its inverse is: rotate by -k, then flip back.
_TRANSFORMS: dict[str, tuple[tuple[int, bool], ...]] = {
    "none": ((0, False),),
    # vertical flip = horizontal flip then a 180° rotation; both flips = 180° rotation
    "flips": ((0, False), (0, True), (2, True), (2, False)),
    "d4": tuple((k, flip) for flip in (False, True) for k in range(4)),
}


def transforms(mode: str) -> tuple[tuple[int, bool], ...]:
    """The (quarter turns, left-right flip) pairs of ``mode``, identity first."""
    if mode not in _TRANSFORMS:
        raise ValueError(f"tta mode must be one of {list(TTA_MODES)}, got {mode!r}")
    return _TRANSFORMS[mode]


def _forward(image: np.ndarray, k: int, flip: bool) -> np.ndarray:
    out = image[:, ::-1] if flip else image
    return np.rot90(out, k, axes=(0, 1))


def _inverse(probs: np.ndarray, k: int, flip: bool) -> np.ndarray:
    out = np.rot90(probs, -k, axes=(0, 1))
    return out[:, ::-1] if flip else out


def predict_with_tta(predict: Callable[[np.ndarray], np.ndarray], image: np.ndarray, mode: str) -> np.ndarray:
    """Mean float32 (H, W) probabilities of ``predict`` over the transforms of ``mode``.

    ``predict`` maps an (H, W) or (H, W, C) image to (H, W) probabilities of the same
    height and width as its input.  Each transformed image is handed over as a
    C-contiguous copy (``torch.from_numpy`` refuses the negative strides of a numpy
    flip view).  The sum runs in float64, so averaging 4 or 8 float32 maps is exact
    when they agree: an equivariant predictor gives back its plain output bit for bit.
    ``mode="none"`` returns ``predict(image)`` itself, with no copy.
    """
    steps = transforms(mode)
    if not isinstance(image, np.ndarray) or image.ndim not in (2, 3):
        desc = f"shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"image must be (H, W) or (H, W, C), got {desc}")
    if mode == "none":
        return predict(image)
    height, width = image.shape[:2]
    total = np.zeros((height, width), dtype=np.float64)
    for k, flip in steps:
        moved = np.ascontiguousarray(_forward(image, k, flip))
        out = np.asarray(predict(moved))
        if out.shape != moved.shape[:2]:
            raise ValueError(
                f"predict returned shape {out.shape} for an input of shape {moved.shape}; expected {moved.shape[:2]}"
            )
        total += _inverse(out, k, flip)
    return (total / len(steps)).astype(np.float32)
