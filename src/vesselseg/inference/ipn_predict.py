"""The predict step for the IPN: prepared volumes -> en-face probability maps and masks.

The IPN maps a volume ``(depth, H, W)`` to an en-face map ``(H, W)``.  To reuse the
2D stitching core unchanged (:func:`vesselseg.inference.sliding_window.
sliding_window_inference`), a volume is handed over as an ``(1, depth, H, W)`` tensor
(depth as channels): windows are cut over the en-face plane only, and the predictor
reshapes each window batch ``(B, depth, h, w)`` to the network's ``(B, 1, depth, h, w)``
and returns ``(B, 1, h, w)`` probabilities.  Window placement, Gaussian blending and
the "no padding" rule are therefore exactly those of the 2D models, and the output
layout is the 2D predictor's, so ``evaluate`` runs unchanged::

    <out_dir>/<split>/probs/<id>.npy   float32 (H, W) in [0, 1]
    <out_dir>/<split>/masks/<id>.png   {0, 255}: probs >= threshold

Memory: one volume as float32 plus, per window batch, the network's activations of
``batch_size`` windows (about ``batch_size * channels * depth * window**2 * 4`` bytes
per layer at the first block's full depth).
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vesselseg import atomic, io
from vesselseg.errors import DataError, ParamsError
from vesselseg.device import amp_dtype, resolve_device
from vesselseg.inference.predict import foreground_probability
from vesselseg.inference.sliding_window import fit_window, sliding_window_inference, validate_args
from vesselseg.layout import PreparedDataset

log = logging.getLogger(__name__)

__all__ = ["depth_as_channels", "load_prepared_volume", "predict_volume", "run_predict_ipn", "volume_path",
           "volume_to_input"]

VOLUMES_DIR = "volumes"


def volume_path(prepared_dir: Path | str, id_: str) -> Path:
    """Where the prepare stage keeps a subject's volume (``prepare.volumes: true``)."""
    return Path(prepared_dir) / VOLUMES_DIR / f"{id_}.npy"


def load_prepared_volume(path: Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Memory-map a prepared volume, uint8 (depth, H, W), checked against the en-face ``shape``.

    Memory-mapped so a trainer that cuts small blocks only pages in those blocks.
    """
    if not path.is_file():
        raise DataError(f"{path}: prepared volume not found; run the prepare stage with prepare.volumes: true")
    try:
        vol = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as err:
        raise DataError(f"{path}: not a readable .npy volume ({err})") from None
    if vol.ndim != 3 or vol.dtype != np.uint8:
        raise DataError(f"{path}: expected a uint8 (depth, H, W) volume, got {vol.dtype} {vol.shape}")
    if shape is not None and tuple(vol.shape[1:]) != tuple(shape):
        raise DataError(
            f"{path}: volume en-face size {vol.shape[1]}x{vol.shape[2]} does not match its prepared image "
            f"{shape[0]}x{shape[1]}; run the prepare stage again"
        )
    return vol


def volume_to_input(volume: np.ndarray) -> np.ndarray:
    """uint8 (depth, H, W) -> float32 (depth, H, W) in [0, 1].

    Goes through :func:`vesselseg.normalize.image_to_input` with depth as the channel
    axis, so volumes and 2D images share the one input scaling.
    """
    from vesselseg.normalize import image_to_input

    return image_to_input(np.moveaxis(np.asarray(volume), 0, -1))


def depth_as_channels(net: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Adapt a (B, 1, D, h, w) -> (B, C, h, w) network to the 2D stitching's (B, D, h, w) windows."""

    def predict(x: torch.Tensor) -> torch.Tensor:
        return net(x.unsqueeze(1))

    return predict


def _probability_predictor(model: torch.nn.Module, device: torch.device, amp: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """Windows in, float32 foreground probabilities (B, 1, h, w) out (probabilities are blended)."""
    dtype = amp_dtype(device, amp)

    def net(x: torch.Tensor) -> torch.Tensor:
        ctx = torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with ctx:
            logits = model(x)
        return foreground_probability(logits)

    return depth_as_channels(net)


def predict_volume(
    model: torch.nn.Module,
    volume: np.ndarray,
    *,
    window: int | tuple[int, int],
    overlap: float,
    weighting: str,
    batch_size: int,
    device: torch.device | str,
    amp: bool,
) -> np.ndarray:
    """Foreground probabilities float32 (H, W) in [0, 1] for one uint8 (depth, H, W) volume.

    The model must already be on ``device``; it is run in eval mode and its previous
    mode restored.  A window at least the en-face size is one forward pass (a longer
    side spans the volume whole, see :func:`~vesselseg.inference.sliding_window.fit_window`).
    """
    if not isinstance(volume, np.ndarray) or volume.dtype != np.uint8 or volume.ndim != 3:
        desc = f"{volume.dtype} {volume.shape}" if isinstance(volume, np.ndarray) else type(volume).__name__
        raise ValueError(f"volume must be uint8 (depth, H, W), got {desc}")
    dev = torch.device(device)
    x = torch.from_numpy(volume_to_input(volume))[None]
    was_training = model.training
    model.eval()
    try:
        probs = sliding_window_inference(
            x, window=fit_window(window, x.shape[2], x.shape[3]), overlap=overlap, predictor=_probability_predictor(model, dev, amp),
            weighting=weighting, batch_size=batch_size, device=dev,
        )
    finally:
        model.train(was_training)
    out = probs[0, 0].cpu().numpy()
    return np.clip(out, 0.0, 1.0, out=out).astype(np.float32, copy=False)


def _check_inputs(dataset: PreparedDataset, splits: Sequence[str]) -> dict[str, list[str]]:
    """Every split's ids, after checking each volume exists and loads (before any work)."""
    ids = {split: dataset.ids(split) for split in splits}
    if any(ids.values()) and not (dataset.root / VOLUMES_DIR).is_dir():
        raise ParamsError(
            f"{dataset.root / VOLUMES_DIR}: no prepared volumes; the ipn model needs prepare.volumes: true "
            "(run the prepare stage again)"
        )
    for split_ids in ids.values():
        for id_ in split_ids:
            path = volume_path(dataset.root, id_)
            load_prepared_volume(path)  # exists and is a volume, before any work
    return ids


def run_predict_ipn(
    *,
    model_path: Path,
    prepared_dir: Path,
    out_dir: Path,
    device: str,
    amp: bool,
    window: int,
    overlap: float,
    weighting: str,
    batch_size: int,
    threshold: float,
    splits: Sequence[str] = ("val", "test"),
    channels_last: bool = False,
) -> dict[str, Any]:
    """Predict every prepared volume of ``splits``; write probability maps and masks.

    ``channels_last`` (``predict.channels_last``) is accepted and has no effect: the
    IPN's convs are 3D, and channels_last is a 4D memory format.
    Params, volume files and sizes are checked before the model is loaded.  Each
    split folder is built under a temporary name and swapped in whole.  Returns
    timing stats shaped as :func:`vesselseg.inference.predict.run_predict`'s.
    """
    from vesselseg.models import load_model

    try:
        win = validate_args(window=window, overlap=overlap, weighting=weighting, batch_size=batch_size)
    except ValueError as err:
        raise ParamsError(f"predict.{err}") from None
    if not 0.0 < float(threshold) < 1.0:
        raise ParamsError(f"predict.threshold must be > 0 and < 1, got {threshold!r}")
    dataset = PreparedDataset(prepared_dir)
    ids = _check_inputs(dataset, splits)

    if not Path(model_path).is_file():
        raise DataError(f"{model_path}: model file not found; run the train stage first")
    dev = resolve_device(device)
    model, meta = load_model(Path(model_path), map_location="cpu")
    config = meta.get("config") or {}
    if config.get("name") != "ipn":
        raise DataError(f"{model_path}: holds a {config.get('name')!r} model, not 'ipn'")
    model = model.to(dev).eval()
    trained_depth = config.get("depth")
    log.info("predicting %d volumes on %s (window %s, overlap %s, %s)", sum(map(len, ids.values())), dev, win,
             overlap, weighting)

    t_start = time.perf_counter()
    stats: dict[str, Any] = {"device": str(dev), "amp_dtype": str(amp_dtype(dev, amp)).replace("torch.", ""),
                             "splits": {}}
    all_seconds: list[float] = []
    bar = tqdm(total=sum(map(len, ids.values())), desc="predict ipn", unit="vol", disable=None)
    try:
        for split, split_ids in ids.items():
            seconds: list[float] = []
            with atomic.atomic_dir(Path(out_dir) / split) as tmp:
                (tmp / "probs").mkdir()
                (tmp / "masks").mkdir()
                for id_ in split_ids:
                    path = volume_path(dataset.root, id_)
                    volume = np.asarray(load_prepared_volume(path))
                    if trained_depth is not None and volume.shape[0] != int(trained_depth):
                        raise DataError(
                            f"{path}: volume depth {volume.shape[0]} but the model was trained on depth "
                            f"{trained_depth}; prepare.volume_depth changed since training (train again)"
                        )
                    t0 = time.perf_counter()
                    probs = predict_volume(model, volume, window=win, overlap=overlap, weighting=weighting,
                                           batch_size=batch_size, device=dev, amp=amp)
                    seconds.append(time.perf_counter() - t0)
                    atomic.write_npy(tmp / "probs" / f"{id_}.npy", probs)
                    io.write_png(tmp / "masks" / f"{id_}.png", probs >= threshold)
                    bar.update(1)
            all_seconds += seconds
            stats["splits"][split] = {"n_images": len(seconds),
                                      "seconds_per_image": statistics.fmean(seconds) if seconds else 0.0}
    finally:
        bar.close()
    stats["n_images"] = len(all_seconds)
    stats["seconds_total"] = time.perf_counter() - t_start
    stats["seconds_per_image"] = statistics.fmean(all_seconds) if all_seconds else 0.0
    stats["seconds_per_image_median"] = statistics.median(all_seconds) if all_seconds else 0.0
    log.info("predicted %d volumes in %.1f s (%.3f s per volume)", stats["n_images"], stats["seconds_total"],
             stats["seconds_per_image"])
    return stats
