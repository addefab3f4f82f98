"""Inference: sliding-window stitching (tensors only) and the predict step (files).

``resolve_device``/``amp_dtype`` live in :mod:`vesselseg.device` (shared with
training) and are re-exported here.
"""

from __future__ import annotations

from vesselseg.inference.predict import amp_dtype, predict_image, resolve_device, run_predict
from vesselseg.inference.sliding_window import compute_starts, importance_map, sliding_window_inference

__all__ = [
    "amp_dtype",
    "compute_starts",
    "importance_map",
    "predict_image",
    "resolve_device",
    "run_predict",
    "sliding_window_inference",
]
