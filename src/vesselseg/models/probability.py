"""Logits to the vessel (foreground) probability: one rule for every network and consumer.

It lives beside the networks, not in the prediction code, because a network uses it
too: a stacked U-Net (W-Net) hands each stage's probability to the next.
"""

from __future__ import annotations

import torch

__all__ = ["foreground_probability"]


def foreground_probability(logits: torch.Tensor) -> torch.Tensor:
    """float32 foreground probability (B, 1, h, w): sigmoid of one output, softmax[1] of two."""
    logits = logits.float()
    if logits.shape[1] == 1:
        return torch.sigmoid(logits)
    if logits.shape[1] == 2:
        return torch.softmax(logits, dim=1)[:, 1:2]
    raise ValueError(f"model must output 1 (sigmoid) or 2 (softmax) channels, got {logits.shape[1]}")
