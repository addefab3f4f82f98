"""Segmentation losses on logits, with an optional field-of-view mask.

Every loss takes ``(logits, target, mask=None)`` and returns a scalar tensor:

* binary losses (``bce``, ``dice``, ``bce+dice``, ``soft_iou``): logits
  ``(N, 1, H, W)``, target ``{0, 1}`` float of the same shape (``(N, H, W)`` is
  accepted too);
* ``ce``: logits ``(N, 2, H, W)``, target class indices ``(N, H, W)`` (long).

``mask`` (same spatial shape as the target, bool or {0, 1}) marks the pixels that
count: outside a fundus FOV the label is 0 by construction, and training on that
black border would only teach the network that black is background.

Dice and IoU are *batch-wise* soft scores: intersections and sums run over the
whole batch before dividing (nnU-Net's "batch dice"), so a patch without any
vessel does not produce a 0/0 that swings the loss.  ``smooth`` (default 1.0) is
added to numerator and denominator: it keeps the loss defined, and equal to 0,
when both prediction and target are empty, and its effect vanishes on batches
with thousands of foreground pixels.
"""

from __future__ import annotations

import difflib
import functools
import logging
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from vesselseg.errors import ParamsError

log = logging.getLogger(__name__)

__all__ = ["LOSSES", "LossFn", "bce_dice_loss", "bce_loss", "build_loss", "ce_loss", "soft_dice_loss", "soft_iou_loss"]

LossName = Literal["bce", "dice", "bce+dice", "soft_iou", "ce"]
LossFn = Callable[..., torch.Tensor]
LOSSES: tuple[str, ...] = ("bce", "dice", "bce+dice", "soft_iou", "ce")


def _binary_inputs(
    logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None, name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if logits.ndim == 4 and logits.shape[1] != 1:
        raise ValueError(
            f"loss {name!r} expects 1 output channel, got logits {tuple(logits.shape)}; use 'ce' for 2 channels"
        )
    if target.ndim == logits.ndim - 1:
        target = target.unsqueeze(1)
    if target.shape != logits.shape:
        raise ValueError(
            f"loss {name!r}: target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}"
        )
    target = target.to(logits.dtype)
    if mask is not None:
        if mask.ndim == logits.ndim - 1:
            mask = mask.unsqueeze(1)
        if mask.shape != logits.shape:
            raise ValueError(
                f"loss {name!r}: mask shape {tuple(mask.shape)} does not match logits {tuple(logits.shape)}"
            )
        mask = mask.to(logits.dtype)
    return logits, target, mask


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    # clamp: an all-masked batch gives 0 (with a graph), not NaN
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def bce_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy on logits, averaged over the (masked) pixels."""
    logits, target, mask = _binary_inputs(logits, target, mask, "bce")
    return _masked_mean(F.binary_cross_entropy_with_logits(logits, target, reduction="none"), mask)


def _soft_counts(
    logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft intersection, sum of probabilities and sum of targets over the batch."""
    prob = torch.sigmoid(logits.float())
    target = target.float()
    if mask is not None:
        prob = prob * mask.float()
        target = target * mask.float()
    return (prob * target).sum(), prob.sum(), target.sum()


def soft_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, *, smooth: float = 1.0
) -> torch.Tensor:
    """``1 - (2 sum(p t) + smooth) / (sum p + sum t + smooth)``, batch-wise."""
    logits, target, mask = _binary_inputs(logits, target, mask, "dice")
    inter, psum, tsum = _soft_counts(logits, target, mask)
    return 1.0 - (2.0 * inter + smooth) / (psum + tsum + smooth)


def soft_iou_loss(
    logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, *, smooth: float = 1.0
) -> torch.Tensor:
    """Soft Jaccard: ``1 - (sum(p t) + smooth) / (sum p + sum t - sum(p t) + smooth)``."""
    logits, target, mask = _binary_inputs(logits, target, mask, "soft_iou")
    inter, psum, tsum = _soft_counts(logits, target, mask)
    return 1.0 - (inter + smooth) / (psum + tsum - inter + smooth)


def bce_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    dice_weight: float = 0.5,
    smooth: float = 1.0,
) -> torch.Tensor:
    """``dice_weight * dice + (1 - dice_weight) * bce``: BCE's per-pixel gradients plus
    Dice's insensitivity to the ~10 % vessel / 90 % background imbalance."""
    return dice_weight * soft_dice_loss(logits, target, mask, smooth=smooth) + (1.0 - dice_weight) * bce_loss(
        logits, target, mask
    )


def ce_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy for a 2-class (softmax) head; target holds class indices."""
    if logits.ndim != 4 or logits.shape[1] < 2:
        raise ValueError(
            f"loss 'ce' expects logits (N, C>=2, H, W), got {tuple(logits.shape)}; use 'bce' for 1 channel"
        )
    if target.ndim == 4 and target.shape[1] == 1:
        target = target[:, 0]
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"loss 'ce': target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}")
    if target.is_floating_point():
        raise ValueError("loss 'ce': target must hold integer class indices (torch.long), got a float tensor")
    if mask is not None:
        if mask.ndim == 4 and mask.shape[1] == 1:
            mask = mask[:, 0]
        if mask.shape != target.shape:
            raise ValueError(f"loss 'ce': mask shape {tuple(mask.shape)} does not match target {tuple(target.shape)}")
        mask = mask.to(logits.dtype)
    return _masked_mean(F.cross_entropy(logits, target.long(), reduction="none"), mask)


def build_loss(name: LossName, dice_weight: float = 0.5, *, smooth: float = 1.0) -> LossFn:
    """The loss called ``name`` (params ``train.loss``) as ``fn(logits, target, mask=None)``.

    ``dice_weight`` only matters for ``bce+dice``; ``smooth`` for the soft scores.
    """
    if name not in LOSSES:
        close = difflib.get_close_matches(str(name), LOSSES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ParamsError(f"train.loss: unknown loss {name!r} (valid: {list(LOSSES)}){hint}")
    if not 0.0 <= float(dice_weight) <= 1.0:
        raise ParamsError(f"train.dice_weight: must be in [0, 1], got {dice_weight!r}")
    if smooth < 0:
        raise ParamsError(f"loss smooth term must be >= 0, got {smooth!r}")
    table: dict[str, LossFn] = {
        "bce": bce_loss,
        "dice": functools.partial(soft_dice_loss, smooth=smooth),
        "bce+dice": functools.partial(bce_dice_loss, dice_weight=float(dice_weight), smooth=smooth),
        "soft_iou": functools.partial(soft_iou_loss, smooth=smooth),
        "ce": ce_loss,
    }
    return table[name]
