"""Losses against hand-worked values, numpy references and torch.nn.functional."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vesselseg.errors import ParamsError
from vesselseg.losses import LOSSES, build_loss, ce_loss

torch.set_num_threads(1)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _np_bce(z: np.ndarray, t: np.ndarray) -> float:
    p = _sigmoid(z)
    return float(np.mean(-(t * np.log(p) + (1 - t) * np.log(1 - p))))


def _np_dice(z: np.ndarray, t: np.ndarray, smooth: float = 1.0) -> float:
    p = _sigmoid(z)
    return 1.0 - (2 * np.sum(p * t) + smooth) / (np.sum(p) + np.sum(t) + smooth)


def _np_iou(z: np.ndarray, t: np.ndarray, smooth: float = 1.0) -> float:
    p = _sigmoid(z)
    inter = np.sum(p * t)
    return 1.0 - (inter + smooth) / (np.sum(p) + np.sum(t) - inter + smooth)


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    logits = 2.0 * torch.randn(3, 1, 7, 9, generator=gen, dtype=torch.float64)
    target = (torch.rand(3, 1, 7, 9, generator=gen) > 0.7).double()
    mask = torch.rand(3, 1, 7, 9, generator=gen) > 0.3
    return logits, target, mask


def test_hand_worked_values() -> None:
    # Logits 0 everywhere -> p = 1/2.  8 pixels, 2 of them vessel.
    logits = torch.zeros(1, 1, 2, 4)
    target = torch.tensor([[[[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]]])
    assert build_loss("bce")(logits, target).item() == pytest.approx(math.log(2))
    # Dice: (2 * 0.5 * 2 + 1) / (0.5 * 8 + 2 + 1) = 3 / 7
    assert build_loss("dice")(logits, target).item() == pytest.approx(1 - 3 / 7)
    # IoU: (1 + 1) / (4 + 2 - 1 + 1) = 2 / 6
    assert build_loss("soft_iou")(logits, target).item() == pytest.approx(1 - 2 / 6)
    # 0.25 * dice + 0.75 * bce
    assert build_loss("bce+dice", dice_weight=0.25)(logits, target).item() == pytest.approx(
        0.25 * (1 - 3 / 7) + 0.75 * math.log(2)
    )


def test_bce_matches_torch_and_numpy(batch) -> None:
    logits, target, _ = batch
    got = build_loss("bce")(logits, target).item()
    assert got == pytest.approx(F.binary_cross_entropy_with_logits(logits, target).item(), rel=1e-12)
    assert got == pytest.approx(_np_bce(logits.numpy(), target.numpy()), rel=1e-9)


def test_soft_scores_match_numpy(batch) -> None:
    logits, target, _ = batch
    z, t = logits.numpy(), target.numpy()
    assert build_loss("dice")(logits, target).item() == pytest.approx(_np_dice(z, t), rel=1e-6)
    assert build_loss("soft_iou")(logits, target).item() == pytest.approx(_np_iou(z, t), rel=1e-6)
    assert build_loss("dice", smooth=0.0)(logits, target).item() == pytest.approx(_np_dice(z, t, 0.0), rel=1e-6)
    w = 0.3
    combo = build_loss("bce+dice", dice_weight=w)(logits, target).item()
    assert combo == pytest.approx(w * _np_dice(z, t) + (1 - w) * _np_bce(z, t), rel=1e-6)


def test_dice_is_batch_wise(batch) -> None:
    """Batch dice pools the counts; it is not the mean of per-image dice."""
    logits, target, _ = batch
    z, t = logits.numpy(), target.numpy()
    pooled = build_loss("dice")(logits, target).item()
    assert pooled == pytest.approx(_np_dice(z, t), rel=1e-6)
    per_image = np.mean([_np_dice(z[i], t[i]) for i in range(len(z))])
    assert abs(pooled - per_image) > 1e-4


@pytest.mark.parametrize("name", ["bce", "dice", "soft_iou", "bce+dice"])
def test_mask_counts_only_valid_pixels(batch, name: str) -> None:
    logits, target, mask = batch
    loss = build_loss(name)
    got = loss(logits, target, mask).item()
    # reference: the same loss on the masked pixels only, as a flat (1, 1, 1, n) "image"
    sel = mask.bool()
    ref = loss(logits[sel].view(1, 1, 1, -1), target[sel].view(1, 1, 1, -1)).item()
    assert got == pytest.approx(ref, rel=1e-9)
    # and changing pixels outside the mask changes nothing
    noisy = logits.clone()
    noisy[~sel] = 100.0
    assert loss(noisy, target, mask).item() == pytest.approx(got, rel=1e-9)


def test_ce_matches_torch_and_equals_bce_for_zero_reference_logit(batch) -> None:
    logits, target, mask = batch
    two = torch.cat([torch.zeros_like(logits), logits], dim=1)  # softmax([0, z])[1] = sigmoid(z)
    labels = target[:, 0].long()
    ce = build_loss("ce")
    assert ce(two, labels).item() == pytest.approx(F.cross_entropy(two, labels).item(), rel=1e-12)
    assert ce(two, labels).item() == pytest.approx(build_loss("bce")(logits, target).item(), rel=1e-9)
    assert ce(two, labels, mask[:, 0]).item() == pytest.approx(build_loss("bce")(logits, target, mask).item(), rel=1e-9)


def test_perfect_and_empty_cases() -> None:
    target = torch.zeros(2, 1, 4, 4)
    target[:, :, 1:3, 1:3] = 1
    perfect = (target * 2 - 1) * 30.0
    for name in ("bce", "dice", "soft_iou", "bce+dice"):
        assert build_loss(name)(perfect, target).item() < 1e-3
    # no vessel and confident background: Dice/IoU are 0 thanks to the smooth term
    empty = torch.zeros(1, 1, 4, 4)
    assert build_loss("dice")(torch.full((1, 1, 4, 4), -30.0), empty).item() < 1e-6
    # an all-zero mask gives 0, not NaN, and gradients still flow
    logits = torch.randn(1, 1, 4, 4, requires_grad=True)
    for name in ("bce", "dice", "soft_iou", "bce+dice"):
        loss = build_loss(name)(logits, empty, torch.zeros(1, 1, 4, 4))
        loss.backward()
        assert math.isfinite(loss.item()) and torch.isfinite(logits.grad).all()


def test_accepts_target_without_channel_axis(batch) -> None:
    logits, target, mask = batch
    for name in ("bce", "dice"):
        loss = build_loss(name)
        assert loss(logits, target[:, 0], mask[:, 0]).item() == pytest.approx(loss(logits, target, mask).item())


def test_errors() -> None:
    with pytest.raises(ParamsError, match=r"train\.loss: unknown loss 'dcie'.*did you mean 'dice'"):
        build_loss("dcie")  # type: ignore[arg-type]
    with pytest.raises(ParamsError, match=r"train\.dice_weight"):
        build_loss("bce+dice", dice_weight=1.5)
    with pytest.raises(ValueError, match="1 output channel"):
        build_loss("bce")(torch.zeros(1, 2, 4, 4), torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="does not match"):
        build_loss("dice")(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError, match="integer class indices"):
        ce_loss(torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 4))
    assert set(LOSSES) == {"bce", "dice", "bce+dice", "soft_iou", "ce"}
