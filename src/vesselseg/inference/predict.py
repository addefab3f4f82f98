"""The predict step: a trained model + prepared images -> probability maps and masks.

Layered as nnU-Net's predictor is: :func:`run_predict` owns files (model, prepared
folder, outputs) for every model family, the family's predictor owns one item
(:meth:`vesselseg.families.base.Family.load_predictor`), :func:`predict_image` owns one
array for the 2D networks, and the stitching core (:mod:`vesselseg.inference.sliding_window`)
only sees tensors.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vesselseg import atomic, imagefiles
from vesselseg.device import amp_dtype, resolve_device
from vesselseg.errors import DataError, ParamsError
from vesselseg.inference.sliding_window import Weighting, fit_window, sliding_window_inference, validate_args
from vesselseg.models.probability import foreground_probability
from vesselseg.normalize import image_to_input
from vesselseg.params import PredictParams
from vesselseg.prepared import PreparedDataset

log = logging.getLogger(__name__)

__all__ = ["amp_dtype", "foreground_probability", "predict_image", "resolve_device", "run_predict"]


def _probability_predictor(
    model: torch.nn.Module, device: torch.device, amp: bool, channels_last: bool = False
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wrap ``model`` so each window comes back as a float32 foreground probability (B, 1, h, w).

    Probabilities (not logits) are blended, so the stitched map is the mean of the
    windows' probabilities and stays in [0, 1] by construction.  ``channels_last``
    says the model's weights are NHWC (:func:`vesselseg.device.to_channels_last`), so
    multi-channel windows are handed over in the same layout instead of being
    converted inside the first conv.
    """
    from vesselseg.models import valid_padding_predictor  # late: keeps the stitching core importable alone

    dtype = amp_dtype(device, amp)
    # A "valid"-padding U-Net returns less than it is given; this wrapper pads and
    # crops so window pixel (i, j) maps to output pixel (i, j).  Other models pass through.
    net = valid_padding_predictor(model)

    def predict(x: torch.Tensor) -> torch.Tensor:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ctx = torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with ctx:
            logits = net(x)
        return foreground_probability(logits)

    return predict


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Predict in eval mode (dropout off, BN running stats) and restore the caller's mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def predict_image(
    model: torch.nn.Module,
    image: np.ndarray,
    *,
    window: int | tuple[int, int] | None,
    overlap: float,
    weighting: Weighting,
    batch_size: int,
    device: torch.device | str,
    amp: bool,
    channels_last: bool = False,
) -> np.ndarray:
    """Foreground probabilities float32 (H, W) in [0, 1] for one uint8 image.

    The model must already be on ``device`` (and in channels_last memory when
    ``channels_last`` is set).  ``window=None`` (or a window at least
    the image size) is one whole-image forward pass, the fastest choice on a CPU when
    memory allows; a window side longer than the image side spans it whole (see
    :func:`vesselseg.inference.sliding_window.fit_window`).
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim not in (2, 3):
        desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"image must be uint8 (H, W) or (H, W, C), got {desc}")
    dev = torch.device(device)
    height, width = int(image.shape[0]), int(image.shape[1])
    window = (height, width) if window is None else fit_window(window, height, width)
    x = torch.from_numpy(image_to_input(image))[None]
    if dev.type == "cuda":
        x = x.pin_memory()
    predictor = _probability_predictor(model, dev, amp, channels_last)
    with _eval_mode(model):
        probs = sliding_window_inference(
            x,
            window=window,
            overlap=overlap,
            predictor=predictor,
            weighting=weighting,
            batch_size=batch_size,
            device=dev,
        )
    out = probs[0, 0].cpu().numpy()
    # Blending rounds in the last bit: keep the documented [0, 1] range exact.
    return np.clip(out, 0.0, 1.0, out=out).astype(np.float32, copy=False)


def run_predict(
    *,
    model_path: Path,
    prepared_dir: Path,
    out_dir: Path,
    predict: PredictParams,
    device: str = "auto",
    amp: bool = True,
    splits: Sequence[str] = ("val", "test"),
) -> dict[str, Any]:
    """The one prediction writer: every image of ``splits``, by whichever family wrote the model.

    The family is read from the model file itself (never from params.yaml, which may
    have changed since training).  Params and every input are checked before the
    model is loaded, so a bad value or an unreadable file fails in a second, naming
    the key or the file.  Outputs, per split::

        <out_dir>/<split>/probs/<id>.npy   float32 (H, W) in [0, 1]
        <out_dir>/<split>/masks/<id>.png   {0, 255}: probs >= predict.threshold

    The whole ``out_dir`` is built under a temporary name and swapped in at once: a
    kill or a full disk between two splits must not leave new ``val`` predictions
    beside old ``test`` ones, and predictions of images no longer in a split never
    survive a re-run.

    Returns timing stats: ``{"device", "amp_dtype", "n_images", "seconds_total",
    "seconds_per_image", "seconds_per_image_median", "splits": {split: {...}}}``, where
    per-image seconds cover the prediction only (not reading or writing files).
    """
    from vesselseg.families import family_of_model_file

    try:
        validate_args(
            window=predict.window if predict.window is not None else 1,
            overlap=predict.overlap,
            weighting=predict.weighting,
            batch_size=predict.batch_size,
        )
    except ValueError as err:
        raise ParamsError(f"predict.{err}") from None
    if not 0.0 < float(predict.threshold) < 1.0:
        raise ParamsError(f"predict.threshold must be > 0 and < 1, got {predict.threshold!r}")
    if not Path(model_path).is_file():
        raise DataError(f"{model_path}: model file not found; run the train stage first")
    dataset = PreparedDataset(prepared_dir)
    ids = {split: dataset.ids(split) for split in splits}
    family = family_of_model_file(model_path)
    family.check_inputs(dataset, [i for split_ids in ids.values() for i in split_ids])
    predictor = family.load_predictor(Path(model_path), predict=predict, device=device, amp=amp)
    n_total = sum(map(len, ids.values()))
    log.info(
        "predicting %d images with the %s model on %s (window %s, overlap %s, %s)",
        n_total,
        family.name,
        predictor.device,
        predict.window or "whole image",
        predict.overlap,
        predict.weighting,
    )

    t_start = time.perf_counter()
    stats: dict[str, Any] = {
        "device": predictor.device,
        "amp_dtype": predictor.amp_dtype,
        **predictor.stats,
        "splits": {},
    }
    all_seconds: list[float] = []
    bar = tqdm(total=n_total, desc=f"predict {family.name}", unit=predictor.unit, disable=None)
    try:
        with atomic.atomic_dir(Path(out_dir)) as root_tmp:
            for split, split_ids in ids.items():
                seconds: list[float] = []
                tmp = root_tmp / split
                (tmp / "probs").mkdir(parents=True)
                (tmp / "masks").mkdir()
                for id_ in split_ids:
                    t0 = time.perf_counter()
                    probs = predictor(dataset, id_)
                    seconds.append(time.perf_counter() - t0)  # .cpu() in the predictors synchronises CUDA
                    atomic.write_npy(tmp / "probs" / f"{id_}.npy", probs)
                    imagefiles.write_png(tmp / "masks" / f"{id_}.png", probs >= predict.threshold)
                    bar.update(1)
                all_seconds += seconds
                stats["splits"][split] = {
                    "n_images": len(seconds),
                    "seconds_per_image": statistics.fmean(seconds) if seconds else 0.0,
                }
    finally:
        bar.close()
    stats["n_images"] = len(all_seconds)
    stats["seconds_total"] = time.perf_counter() - t_start
    stats["seconds_per_image"] = statistics.fmean(all_seconds) if all_seconds else 0.0
    stats["seconds_per_image_median"] = statistics.median(all_seconds) if all_seconds else 0.0
    log.info(
        "predicted %d images in %.1f s (%.3f s per image)",
        stats["n_images"],
        stats["seconds_total"],
        stats["seconds_per_image"],
    )
    return stats
