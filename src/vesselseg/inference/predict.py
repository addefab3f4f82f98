"""The predict step: a trained model + prepared images -> probability maps and masks.

Layered as nnU-Net's predictor is: :func:`run_predict` owns files (model, prepared
folder, outputs), :func:`predict_image` owns one array, and the stitching core
(:mod:`vesselseg.inference.sliding_window`) only sees tensors.

Outputs, per split (``val``, ``test``)::

    <out_dir>/<split>/probs/<id>.npy   float32 (H, W) in [0, 1]
    <out_dir>/<split>/masks/<id>.png   {0, 255}: probs >= threshold

Each split folder is built under a temporary name and swapped in whole, so stale
predictions of images no longer in the split never survive a re-run.
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
from PIL import Image
from tqdm.auto import tqdm

from vesselseg import atomic, io
from vesselseg.device import amp_dtype, resolve_device, to_channels_last
from vesselseg.errors import DataError, ParamsError
from vesselseg.inference.sliding_window import fit_window, sliding_window_inference, validate_args
from vesselseg.layout import PreparedDataset
from vesselseg.normalize import image_to_input

log = logging.getLogger(__name__)

__all__ = ["amp_dtype", "predict_image", "resolve_device", "run_predict"]




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


def foreground_probability(logits: torch.Tensor) -> torch.Tensor:
    """float32 foreground probability (B, 1, h, w): sigmoid of one output, softmax[1] of two."""
    logits = logits.float()
    if logits.shape[1] == 1:
        return torch.sigmoid(logits)
    if logits.shape[1] == 2:
        return torch.softmax(logits, dim=1)[:, 1:2]
    raise ValueError(f"model must output 1 (sigmoid) or 2 (softmax) channels, got {logits.shape[1]}")


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
    weighting: str,
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
            x, window=window, overlap=overlap, predictor=predictor, weighting=weighting, batch_size=batch_size, device=dev
        )
    out = probs[0, 0].cpu().numpy()
    # Blending rounds in the last bit: keep the documented [0, 1] range exact.
    return np.clip(out, 0.0, 1.0, out=out).astype(np.float32, copy=False)


def _image_size(path: Path) -> tuple[int, int]:
    """(H, W) from the file header only, so every image is checked before any work."""
    try:
        with Image.open(path) as im:
            width, height = im.size
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as err:  # PIL raises several types for unreadable files
        raise DataError(f"{path}: not a readable image ({type(err).__name__})") from None
    return height, width


def _load_model(model_path: Path, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    from vesselseg.models import load_model  # imported late: torch-heavy, and owned by the models module

    if not Path(model_path).is_file():
        raise DataError(f"{model_path}: model file not found; run the train stage first")
    model, meta = load_model(model_path, map_location="cpu")
    return model.to(device), meta


def run_predict(
    *,
    model_path: Path,
    prepared_dir: Path,
    out_dir: Path,
    splits: Sequence[str] = ("val", "test"),
    window: int | tuple[int, int] | None,
    overlap: float,
    weighting: str,
    batch_size: int,
    threshold: float,
    device: str = "auto",
    amp: bool = True,
    channels_last: bool = True,
) -> dict[str, Any]:
    """Predict every image of ``splits`` and write probability maps and masks.

    All params and every image are checked before the model is loaded, so a bad
    param or an unreadable file fails in a second, naming the file or the key.
    ``window=None`` predicts each whole image in one forward pass; a window side longer
    than an image side spans that side whole.

    Returns timing stats: ``{"device", "amp_dtype", "n_images", "seconds_total",
    "seconds_per_image", "seconds_per_image_median", "splits": {split: {...}}}``, where
    per-image seconds cover the prediction only (not reading or writing files).
    """
    try:
        win = validate_args(window=window if window is not None else 1, overlap=overlap, weighting=weighting, batch_size=batch_size)
    except ValueError as err:
        raise ParamsError(f"predict.{err}") from None
    if not 0.0 < float(threshold) < 1.0:
        raise ParamsError(f"predict.threshold must be > 0 and < 1, got {threshold!r}")
    dataset = PreparedDataset(prepared_dir)
    ids = {split: dataset.ids(split) for split in splits}
    for split, split_ids in ids.items():
        for id_ in split_ids:
            _image_size(dataset.paths(id_)[0])  # readable, with a header, before any work

    dev = resolve_device(device)
    model, meta = _load_model(Path(model_path), dev)
    in_channels = (meta.get("config") or {}).get("in_channels")
    model.eval()
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one window shape per run: autotuning pays off
    channels_last = channels_last and to_channels_last(model)
    log.info("predicting %d images on %s (window %s, overlap %s, %s)", sum(map(len, ids.values())), dev, window or "whole image", overlap, weighting)

    t_start = time.perf_counter()
    dtype = amp_dtype(dev, amp)
    stats: dict[str, Any] = {"device": str(dev), "amp_dtype": str(dtype).removeprefix("torch.") if dtype else "float32", "splits": {}}
    all_seconds: list[float] = []
    bar = tqdm(total=sum(map(len, ids.values())), desc="predict", unit="img", disable=None)
    # One atomic swap for the whole output folder: a kill or a full disk between two
    # splits must not leave new val predictions beside old test ones.
    try:
        with atomic.atomic_dir(Path(out_dir)) as root_tmp:
            for split, split_ids in ids.items():
                seconds: list[float] = []
                tmp = root_tmp / split
                (tmp / "probs").mkdir(parents=True)
                (tmp / "masks").mkdir()
                for id_ in split_ids:
                    img_path = dataset.paths(id_)[0]
                    image = io.read_image(img_path)
                    if in_channels is not None and (1 if image.ndim == 2 else image.shape[2]) != in_channels:
                        raise DataError(
                            f"{img_path}: image has {1 if image.ndim == 2 else image.shape[2]} channel(s) "
                            f"but the model expects {in_channels} (model.in_channels)"
                        )
                    t0 = time.perf_counter()
                    probs = predict_image(
                        model, image, window=None if window is None else win, overlap=overlap, weighting=weighting,
                        batch_size=batch_size, device=dev, amp=amp, channels_last=channels_last,
                    )
                    seconds.append(time.perf_counter() - t0)  # .cpu() in predict_image synchronises CUDA
                    atomic.write_npy(tmp / "probs" / f"{id_}.npy", probs)
                    io.write_png(tmp / "masks" / f"{id_}.png", probs >= threshold)
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
    log.info("predicted %d images in %.1f s (%.3f s per image)", stats["n_images"], stats["seconds_total"], stats["seconds_per_image"])
    return stats
