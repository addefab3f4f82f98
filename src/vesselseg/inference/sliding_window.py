"""Sliding-window inference: predict fixed-size windows and stitch them back.

A functional core in MONAI's style (``monai.inferers.sliding_window_inference``):
tensors in, tensors out, any callable as the predictor, no file access and no state
kept between calls.  It differs from MONAI in two deliberate ways:

* **Window placement** follows nnU-Net's ``compute_steps_for_sliding_window``: the
  number of windows per axis is ``ceil((size - window) / (window * (1 - overlap))) + 1``
  and the starts are spread *evenly* so the last window ends exactly on the border.
  MONAI steps by ``int(window * (1 - overlap))`` and pushes only the last window back
  onto the border, so its last two windows overlap more than the others.  Both place
  the same number of windows, and the positions coincide whenever
  ``size - window`` is a multiple of the integer stride.
* **No padding.**  MONAI pads an image smaller than the window and crops the result
  back; here that is an error naming ``predict.window``.  A vessel net sees padded
  zeros as a black border and draws false vessels along it, so the pipeline refuses
  rather than quietly changing the input.  A window exactly the size of the image is
  one whole-image forward pass (the fast path).
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Callable
from typing import Literal

import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

__all__ = [
    "WEIGHTINGS",
    "Weighting",
    "compute_starts",
    "fit_window",
    "importance_map",
    "sliding_window_inference",
    "validate_args",
]

Weighting = Literal["constant", "gaussian"]
WEIGHTINGS = ("constant", "gaussian")

# Floor of the Gaussian importance map, as MONAI's compute_importance_map: with
# sigma = 0.125 * window the corner weight is ~1e-7, which would let a pixel seen only
# by window corners (the image corners) be divided by almost nothing.
_MIN_WEIGHT = 1e-3


def _pair(window: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(window, bool):
        raise ValueError(f"window must be an int or a pair of ints, got {window!r}")
    if isinstance(window, int):
        return (window, window)
    if (
        isinstance(window, (tuple, list))
        and len(window) == 2
        and all(isinstance(w, int) and not isinstance(w, bool) for w in window)
    ):
        return (int(window[0]), int(window[1]))
    raise ValueError(f"window must be an int or a pair of ints, got {window!r}")


def validate_args(
    *,
    window: int | tuple[int, int],
    overlap: float,
    weighting: str,
    batch_size: int,
    sigma_scale: float = 0.125,
) -> tuple[int, int]:
    """Check the settings before any work; return the window as (height, width).

    Public so the predict stage can reject bad params before it loads a model.
    """
    win = _pair(window)
    if min(win) < 1:
        raise ValueError(f"window must be >= 1, got {window!r}")
    if not isinstance(overlap, (int, float)) or isinstance(overlap, bool) or not 0.0 <= float(overlap) < 1.0:
        raise ValueError(f"overlap must be >= 0 and < 1, got {overlap!r}")
    if weighting not in WEIGHTINGS:
        close = difflib.get_close_matches(str(weighting), WEIGHTINGS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"weighting must be one of {list(WEIGHTINGS)}, got {weighting!r}{hint}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not isinstance(sigma_scale, (int, float)) or not float(sigma_scale) > 0.0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale!r}")
    return win


def fit_window(window: int | tuple[int, int], height: int, width: int) -> tuple[int, int]:
    """Shrink each window side that is longer than the image to the image side.

    Used by the predict stage (not by :func:`sliding_window_inference`, which stays
    strict like a library function should): a fully convolutional net takes any size,
    so a side that does not fit is covered by one window spanning it whole, without
    padding.  This is what lets ``predict.window`` default to a large value: images
    smaller than it (DRIVE, OCTA, the synthetic set) are one whole-image forward pass,
    the CPU's lower bound, and only large ones (HRF) are tiled, with bounded memory.
    """
    wh, ww = _pair(window)
    return (min(wh, int(height)), min(ww, int(width)))


def compute_starts(size: int, window: int, overlap: float) -> list[int]:
    """Window start offsets along one axis, spread evenly, last one ending on the border.

    nnU-Net's rule: aim for a stride of ``window * (1 - overlap)``, take the fewest
    windows that achieve at most that stride, then spread them evenly (rounded).
    """
    if size < window:
        raise ValueError(f"window {window} is larger than the image side {size}")
    span = size - window
    if span == 0:
        return [0]
    target = max(window * (1.0 - overlap), 1.0)
    # The small tolerance keeps e.g. 96 * (1 - 0.7) = 28.799999... from adding a window.
    n = math.ceil(span / target - 1e-9) + 1
    step = span / (n - 1)
    return [round(step * i) for i in range(n)]


def importance_map(
    window: tuple[int, int],
    weighting: str,
    *,
    sigma_scale: float = 0.125,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Per-pixel weight of a window's prediction, float32 (h, w).

    Gaussian (MONAI's formula, so the two agree to rounding): for an axis of length n,
    ``g(i) = exp(-(i - (n - 1) / 2) ** 2 / (2 * (sigma_scale * n) ** 2))`` for
    i = 0..n-1; the map is the outer product ``g_h(y) * g_w(x)`` (peak 1 at the centre),
    clamped below at ``max(min(map), 1e-3)`` so border pixels keep a non-zero weight.
    Constant: all ones.
    """
    h, w = window
    if weighting == "constant":
        return torch.ones((h, w), dtype=torch.float32, device=device)
    axes = []
    for n in (h, w):
        x = torch.arange(-(n - 1) / 2.0, (n - 1) / 2.0 + 1, dtype=torch.float32, device=device)
        axes.append(torch.exp(x**2 / (-2.0 * (sigma_scale * n) ** 2)))
    weights = axes[0][:, None] * axes[1][None, :]
    floor = max(float(weights.min()), _MIN_WEIGHT)
    return weights.clamp_(min=floor)


def sliding_window_inference(
    inputs: torch.Tensor,
    *,
    window: int | tuple[int, int],
    overlap: float,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    weighting: Weighting = "gaussian",
    batch_size: int = 16,
    sigma_scale: float = 0.125,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Run ``predictor`` on overlapping windows of ``inputs`` and blend the results.

    Windows are placed evenly with the last one ending on the border (see the module
    docstring); an image smaller than the window is refused, not padded.  Windows are
    cut from all N images, sent to ``predictor`` ``batch_size`` at a time, weighted by
    the importance map and added into two preallocated float32 buffers (weighted sum
    and weight sum); at most one batch of windows exists at any time.  A window equal
    to the image is a single forward pass per batch of images with no blending.

    Args:
        inputs: (N, C, H, W) float tensor.
        window: window size, an int or (height, width), each >= 1 and <= the image.
        overlap: fraction of a window shared with its neighbour, in [0, 1).
        predictor: any callable mapping (B, C, h, w) to (B, C_out, h, w); C_out may
            differ from C.  Its output may be in a lower precision (autocast); it is
            accumulated in float32.
        weighting: {"constant", "gaussian"}; "gaussian" trusts window centres more.
        batch_size: windows per predictor call.
        sigma_scale: Gaussian sigma as a fraction of the window side.
        device: where windows are predicted and stitched; default ``inputs.device``.
            The result is returned on this device.
        progress: show a tqdm bar over window batches.

    Returns:
        float32 (N, C_out, H, W).

    Note:
        Inputs are channel-first with a batch dimension (NCHW), as in MONAI.  Autocast
        and channels_last are the caller's job (see ``vesselseg.inference.predict``).
    """
    win = validate_args(
        window=window, overlap=overlap, weighting=weighting, batch_size=batch_size, sigma_scale=sigma_scale
    )
    if not isinstance(inputs, torch.Tensor) or inputs.ndim != 4:
        shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise ValueError(f"inputs must be an (N, C, H, W) tensor, got {shape}")
    _, _, height, width = inputs.shape
    if win[0] > height or win[1] > width:
        raise ValueError(
            f"predict.window {win[0]}x{win[1]} (h x w) is larger than the image {height}x{width}; "
            "images are not padded: lower predict.window to at most the smallest image side"
        )
    dev = torch.device(device) if device is not None else inputs.device
    non_blocking = dev.type == "cuda" or inputs.device.type == "cuda"
    # One transfer of the whole input (a few MB even for HRF) instead of one per window.
    inputs = inputs.to(dev, non_blocking=non_blocking)

    # no_grad around the bookkeeping, inference_mode around each window batch only:
    # the output buffers are allocated outside it, so the returned tensor is an
    # ordinary tensor the caller may modify in place (an inference tensor would refuse
    # that outside inference mode).
    with torch.no_grad():
        if win == (height, width):
            return _whole_image(inputs, predictor, batch_size, progress)
        return _stitch(inputs, win, overlap, predictor, weighting, batch_size, sigma_scale, progress)


def _whole_image(
    inputs: torch.Tensor, predictor: Callable[[torch.Tensor], torch.Tensor], batch_size: int, progress: bool
) -> torch.Tensor:
    """Fast path: one window covers the image, so blending weights cancel out exactly."""
    outs = []
    for i in tqdm(range(0, inputs.shape[0], batch_size), disable=not progress, desc="image batches", leave=False):
        with torch.inference_mode():
            pred = predictor(inputs[i : i + batch_size])
        _check_output(pred, inputs[i : i + batch_size].shape)
        # Copy: the predictor may return its input (identity), which aliases the caller's tensor.
        outs.append(pred.to(torch.float32, copy=True))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _check_output(pred: object, in_shape: torch.Size) -> None:
    if (
        not isinstance(pred, torch.Tensor)
        or pred.ndim != 4
        or pred.shape[0] != in_shape[0]
        or pred.shape[2:] != in_shape[2:]
    ):
        got = tuple(pred.shape) if isinstance(pred, torch.Tensor) else type(pred).__name__
        raise ValueError(
            f"predictor must return a (B, C_out, h, w) tensor matching its input {tuple(in_shape)}, got {got}"
        )


def _stitch(
    inputs: torch.Tensor,
    win: tuple[int, int],
    overlap: float,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    weighting: str,
    batch_size: int,
    sigma_scale: float,
    progress: bool,
) -> torch.Tensor:
    n_img, _, height, width = inputs.shape
    wh, ww = win
    dev = inputs.device
    ys = compute_starts(height, wh, overlap)
    xs = compute_starts(width, ww, overlap)
    # Window k of image n: positions are identical for every image, so the weight
    # sum is built once for one image and broadcast over N and C at the end.
    coords = [(n, y, x) for n in range(n_img) for y in ys for x in xs]
    constant = weighting == "constant"
    weights = importance_map(win, weighting, sigma_scale=sigma_scale, device=dev)

    out: torch.Tensor | None = None
    for b0 in tqdm(range(0, len(coords), batch_size), disable=not progress, desc="window batches", leave=False):
        chunk = coords[b0 : b0 + batch_size]
        with torch.inference_mode():
            # torch.stack of views: one copy per window, straight into the batch tensor
            # (an inference tensor, as the predictor's own would be under MONAI).
            batch = torch.stack([inputs[n, :, y : y + wh, x : x + ww] for n, y, x in chunk])
            pred = predictor(batch)
        _check_output(pred, batch.shape)
        if out is None:
            out = torch.zeros((n_img, pred.shape[1], height, width), dtype=torch.float32, device=dev)
        if pred.dtype != torch.float32:
            pred = pred.float()
        # In-place accumulation into views of the output; the predictor's tensor is
        # never modified (it may alias the batch or the caller's data).
        for p, (n, y, x) in zip(pred, chunk, strict=True):
            view = out[n, :, y : y + wh, x : x + ww]
            if constant:
                view.add_(p)
            else:
                view.addcmul_(p, weights)
    if out is None:  # unreachable: every image has at least one window
        raise RuntimeError("sliding_window_inference: no window was predicted")
    # The weight sum is built only now, once for all N images (positions are shared):
    # it is then never alive together with the predictor's activations, which keeps
    # the peak memory at output + one batch (measured on an HRF-size image).
    weight_sum = torch.zeros((height, width), dtype=torch.float32, device=dev)
    for y in ys:
        for x in xs:
            weight_sum[y : y + wh, x : x + ww].add_(weights)
    return out.div_(weight_sum)
