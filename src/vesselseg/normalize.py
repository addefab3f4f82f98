"""The one mapping from a stored uint8 image to the network's input.

Training patches and full-image prediction both go through :func:`image_to_input`,
so the two can never drift apart.  Contrast normalisation is the prepare stage's
job (equalization), so this only rescales to [0, 1] and moves channels first:
a per-image z-score would make a patch's input depend on the rest of its image.
"""

from __future__ import annotations

import numpy as np


def image_to_input(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W) or (H, W, C) -> float32 (C, H, W) in [0, 1]."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3:
        arr = np.moveaxis(arr, -1, 0)
    else:
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float32) * np.float32(1.0 / 255.0)


def batch_to_input(patches: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) or (N, H, W, C) -> float32 (N, C, H, W), same scaling."""
    arr = np.asarray(patches)
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4:
        arr = np.moveaxis(arr, -1, 1)
    else:
        raise ValueError(f"expected (N, H, W) or (N, H, W, C) patches, got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float32) * np.float32(1.0 / 255.0)
