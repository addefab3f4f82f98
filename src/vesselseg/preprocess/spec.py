"""The preprocessing a model was trained with, as data: one spec, one implementation.

A model is only usable on a new image if that image is prepared exactly as its
training images were (channel, equalization, gamma, resolution, FOV, input scaling).
:func:`preprocessing_spec` writes those settings into a plain JSON-able dict that
travels inside every model file (``extra["preprocessing"]``), the ONNX metadata and
the MLflow model; :func:`preprocess_image` applies a spec to one image.  The prepare
stage itself calls :func:`preprocess_image` for the image part, so what ``segment``
does to a new photo cannot drift from what ``prepare`` did to the training set (as
nnU-Net's predictor reads the plans stored with the trained model, never the user's
config).

Resolution rules (``prepare.scale`` / ``prepare.fov_diameter``, exclusive):

- ``scale`` resizes every image by the same factor;
- ``fov_diameter`` resizes each fundus image so the diameter of its field of view
  becomes that many pixels.  The diameter is the larger side of the FOV's bounding
  box, not ``2 * sqrt(area / pi)``: many cameras crop the disc at the top and bottom
  (HRF, CHASE_DB1, most phone adapters), which shrinks the area but not the
  horizontal extent, so the bounding box gives the same number for a cropped and an
  uncropped photo of one eye at one resolution;
- OCTA en-face maps (volume datasets) keep their size whatever the rule: their pixel
  spacing is fixed by the scan protocol (3 mm over the map width), and their "FOV"
  is the whole map, so there is no disc to measure.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from vesselseg.errors import DataError
from vesselseg.params import DataParams, ModelParams, PredictParams, PrepareParams

log = logging.getLogger(__name__)

__all__ = [
    "SPEC_VERSION",
    "VOLUME_DATASETS",
    "PreparedImage",
    "fov_diameter",
    "image_spec",
    "preprocess_image",
    "preprocessing_spec",
    "resize_image",
    "resize_mask",
    "to_native",
]

SPEC_VERSION = 1
# datasets whose images are projections of OCT(A) volumes made by the prepare stage
VOLUME_DATASETS = ("synthetic", "octa500")
# datasets with a field-of-view disc: official masks, or masks derived by data/fov.py
FUNDUS_DATASETS = ("drive", "hrf", "chase_db1", "stare", "synthetic-fundus", "retina_kaggle")
# fov_from_image's defaults: the settings the retina adapters derive missing masks with
_FOV_DERIVE = {"rel_threshold": 0.1, "closing_radius": 5, "erode_radius": 0}


@dataclass(frozen=True)
class PreparedImage:
    """One image as the network sees it, and what maps its output back.

    ``image`` is uint8 (H, W) or (H, W, C) at the prepared size, zero outside ``fov``
    (bool, same size).  ``scale`` is prepared size / native size (1.0 when unchanged)
    and ``native_shape`` the (H, W) of the image given, so
    ``to_native(probs, native_shape)`` puts a probability map back on the input's
    pixels, where ``native_fov`` (given or derived, before any resizing) applies.
    """

    image: np.ndarray
    fov: np.ndarray
    scale: float
    native_shape: tuple[int, int]
    fov_derived: bool
    native_fov: np.ndarray


def _fov_rule(data: DataParams) -> str:
    if data.dataset in FUNDUS_DATASETS or (data.dataset == "folder" and data.folder.fov):
        return "derive"
    return "full"


def image_spec(data: DataParams, prepare: PrepareParams) -> dict[str, Any]:
    """The image part of the spec (what the prepare stage needs); JSON-able."""
    volume = data.dataset in VOLUME_DATASETS
    return {
        "version": SPEC_VERSION,
        "dataset": data.dataset,
        # volume datasets: the network saw min-max stretched en-face projections
        "source": "projection" if volume else "image",
        "projection": {"method": prepare.projection, "slab": list(prepare.slab) if prepare.slab else None}
        if volume
        else None,
        "channel": prepare.channel,
        "equalize": {
            "method": prepare.equalize,
            "clahe_clip": float(prepare.clahe_clip),
            "clahe_tile": int(prepare.clahe_tile),
        },
        "gamma": float(prepare.gamma),
        "resolution": {"scale": float(prepare.scale), "fov_diameter": None if volume else prepare.fov_diameter},
        "fov": {"rule": _fov_rule(data), **_FOV_DERIVE},
    }


def preprocessing_spec(
    data: DataParams,
    prepare: PrepareParams,
    model: ModelParams,
    threshold: float,
    *,
    predict: PredictParams | None = None,
) -> dict[str, Any]:
    """Everything ``segment`` needs to reproduce training-time preprocessing, as a plain dict.

    ``threshold`` is the probability cut chosen on validation (``predict.threshold``
    unless the trainer tuned it).  ``predict`` (default: the schema's defaults) gives
    the sliding-window settings segment uses.  Input scaling is the one of
    :func:`vesselseg.normalize.image_to_input`: uint8 / 255 -> float32 in [0, 1],
    channels first; ``input_norm`` says the network standardises each window itself.
    """
    pred = predict or PredictParams()
    return {
        **image_spec(data, prepare),
        "input": {"dtype": "uint8", "scaling": "divide_255", "layout": "NCHW", "input_norm": bool(model.input_norm)},
        "in_channels": int(model.in_channels),
        "model_name": model.name,
        "threshold": float(threshold),
        "window": {
            "size": pred.window,
            "overlap": float(pred.overlap),
            "weighting": pred.weighting,
            "batch_size": int(pred.batch_size),
        },
    }


def check_spec(spec: Any, where: str) -> dict[str, Any]:
    """Refuse a spec this code cannot apply, naming where it came from."""
    if not isinstance(spec, dict):
        raise DataError(f"{where}: preprocessing spec must be a mapping, got {type(spec).__name__}")
    version = spec.get("version")
    if version != SPEC_VERSION:
        raise DataError(f"{where}: preprocessing spec version {version!r} is not supported (expected {SPEC_VERSION})")
    missing = [k for k in ("channel", "equalize", "gamma", "resolution", "fov") if k not in spec]
    if missing:
        raise DataError(f"{where}: preprocessing spec lacks {', '.join(missing)}")
    return spec


def fov_diameter(fov: np.ndarray) -> int:
    """The FOV's diameter in pixels: the larger side of its bounding box (see module doc)."""
    rows = np.flatnonzero(fov.any(axis=1))
    cols = np.flatnonzero(fov.any(axis=0))
    if rows.size == 0:
        raise DataError("FOV mask is empty; cannot measure its diameter")
    return int(max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1))


def _size(shape: tuple[int, ...], scale: float) -> tuple[int, int]:
    """cv2 (width, height) of ``shape`` scaled by ``scale``, at least 1 px."""
    h, w = shape[:2]
    return max(1, round(w * scale)), max(1, round(h * scale))


def resize_image(image: np.ndarray, scale: float) -> np.ndarray:
    """Area-average when shrinking (no aliasing of thin vessels), bilinear when enlarging."""
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, _size(image.shape, scale), interpolation=interp)


def resize_mask(mask: np.ndarray, scale: float) -> np.ndarray:
    """Resize a bool mask: area-averaged and kept where at least half the source was set.

    That keeps thin vessels connected better than nearest-neighbour sampling.
    """
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(mask.astype(np.float32), _size(mask.shape, scale), interpolation=interp) >= 0.5


def to_native(probs: np.ndarray, native_shape: tuple[int, int]) -> np.ndarray:
    """Map a probability map at the prepared size back to the image's (H, W).

    Bilinear when enlarging, area-average when shrinking; float32 in [0, 1].  The
    identity (a copy-free pass-through) when the sizes already agree.
    """
    probs = np.asarray(probs, dtype=np.float32)
    h, w = int(native_shape[0]), int(native_shape[1])
    if probs.shape[:2] == (h, w):
        return probs
    interp = cv2.INTER_AREA if h * w < probs.shape[0] * probs.shape[1] else cv2.INTER_LINEAR
    out = cv2.resize(probs, (w, h), interpolation=interp)
    return np.clip(out, 0.0, 1.0, out=out).astype(np.float32, copy=False)


def _derive_fov(image: np.ndarray, rule: dict[str, Any]) -> np.ndarray:
    from vesselseg.data.fov import fov_from_image

    if rule.get("rule") == "full":
        return np.ones(image.shape[:2], dtype=bool)
    return fov_from_image(
        image,
        rel_threshold=float(rule["rel_threshold"]),
        closing_radius=int(rule["closing_radius"]),
        erode_radius=int(rule["erode_radius"]),
    )


def preprocess_image(image: np.ndarray, spec: dict[str, Any], fov: np.ndarray | None = None) -> PreparedImage:
    """Apply ``spec`` to one uint8 image (grey or RGB, as :func:`vesselseg.imagefiles.read_image` gives).

    Steps, in the order the prepare stage has always used: the FOV (given, else the
    spec's rule applied to the image as given: the red channel of a colour photo
    finds the disc best), channel choice, (projection specs) min-max stretch, the
    resolution rule, equalization with the FOV as mask, then zero outside the FOV.
    """
    from vesselseg.preprocess.equalize import equalize, select_channel, to_uint8_projection

    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3) or arr.size == 0:
        raise DataError(f"expected a uint8 (H, W) or (H, W, 3) image, got {arr.dtype} {arr.shape}")
    native_shape = (int(arr.shape[0]), int(arr.shape[1]))
    derived = fov is None
    if fov is None:
        fov = _derive_fov(arr, spec["fov"])
    else:
        fov = np.asarray(fov, dtype=bool)
        if fov.shape != native_shape:
            raise DataError(
                f"FOV mask size {fov.shape[1]}x{fov.shape[0]} differs from its image "
                f"{native_shape[1]}x{native_shape[0]}"
            )
    if not fov.any():
        raise DataError("FOV mask is empty")
    native_fov = fov
    out = select_channel(arr, spec["channel"])
    if spec.get("source") == "projection":
        if out.ndim == 3:  # an en-face map saved as RGB: its grey level is the signal
            out = select_channel(out, "grey")
        out = to_uint8_projection(out)  # the stretch prepare applied to the projection
    res = spec["resolution"]
    scale = float(res.get("scale", 1.0))
    if res.get("fov_diameter"):
        scale = float(res["fov_diameter"]) / fov_diameter(fov)
    if scale != 1.0:
        out = resize_image(out, scale)
        fov = resize_mask(fov, scale)
        if not fov.any():
            raise DataError(f"FOV mask vanishes at scale {scale:.3g}")
    eq = spec["equalize"]
    out = equalize(
        out,
        method=eq["method"],
        clahe_clip=eq["clahe_clip"],
        clahe_tile=eq["clahe_tile"],
        gamma=spec["gamma"],
        mask=fov,
    )
    out = out * fov[..., None].astype(np.uint8) if out.ndim == 3 else np.where(fov, out, 0).astype(np.uint8)
    return PreparedImage(
        image=out, fov=fov, scale=scale, native_shape=native_shape, fov_derived=derived, native_fov=native_fov
    )
