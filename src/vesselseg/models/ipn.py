"""Image Projection Network (IPN): 3D OCTA volume in, 2D en-face vessel map out.

Li et al., "Image Projection Network: 3D to 2D Image Segmentation in OCTA Images",
IEEE TMI 2020.  The idea: 3D convolutions see the volume, and *unidirectional* max
pooling (kernel ``(k, 1, 1)``) shrinks only the depth axis, so the lateral resolution
is kept all the way down; once depth has collapsed to 1 a 2D head produces the map.
The network thereby learns its own projection instead of a fixed mean/max over a
hand-picked slab.

Depth schedule (documented because any input depth must work):
:func:`depth_pool_factors` splits the nominal ``depth`` into ``n_blocks`` pooling
factors, one per block, as near-equal divisors whose product is exactly ``depth``
when the depth factorises that way (160 with 3 blocks -> 8, 5, 4) and otherwise as
``ceil`` roots whose product is at least ``depth``.  Pooling uses ``ceil_mode`` and
a final adaptive max over depth, so a volume of any depth (also one that differs
from the nominal ``depth``) still collapses to exactly 1.

Note:
    Input ``(N, in_channels, D, H, W)`` with D = depth (axial), H, W = en-face axes;
    output logits ``(N, out_channels, H, W)``.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from vesselseg.models.unet import init_kaiming

log = logging.getLogger(__name__)

__all__ = ["IPN", "depth_pool_factors"]


def depth_pool_factors(depth: int, n_blocks: int) -> list[int]:
    """Per-block pooling factors along depth (product == depth when possible).

    Searches the factorisations of ``depth`` into ``n_blocks`` integers >= 1 for
    the most even one (smallest maximum factor).  Large factors come first: the
    later, cheaper blocks then work on fewer depth slices, which is where 3D convs
    spend their time.  A prime or
    awkward depth falls back to equal ``ceil`` roots, whose product overshoots
    ``depth`` and relies on ``ceil_mode`` pooling.
    """
    if depth < 1 or n_blocks < 1:
        raise ValueError(f"depth and n_blocks must be >= 1, got depth={depth}, n_blocks={n_blocks}")
    ideal = depth ** (1.0 / n_blocks)

    best: list[int] | None = None

    def search(rest: int, k: int, acc: list[int]) -> None:
        nonlocal best
        if k == 1:
            cand = sorted(acc + [rest], reverse=True)
            if best is None or max(cand) < max(best):
                best = cand
            return
        for f in range(1, rest + 1):
            if rest % f == 0:
                search(rest // f, k - 1, acc + [f])

    if depth <= 4096:
        search(depth, n_blocks, [])
    # An exact split is only worth it if no factor is much larger than the ideal.
    if best is not None and max(best) <= 2 * math.ceil(ideal):
        return best
    f = math.ceil(ideal - 1e-9)
    return [f] * n_blocks


class _Block3d(nn.Sequential):
    """Two 3x3x3 conv-BN-ReLU, then depth-only max pooling (the IPN's PLM unit)."""

    def __init__(self, cin: int, cout: int, pool: int, batch_norm: bool) -> None:
        layers: list[nn.Module] = []
        for a, b in ((cin, cout), (cout, cout)):
            layers.append(nn.Conv3d(a, b, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm3d(b))
            layers.append(nn.ReLU(inplace=True))
        if pool > 1:
            layers.append(nn.MaxPool3d(kernel_size=(pool, 1, 1), stride=(pool, 1, 1), ceil_mode=True))
        super().__init__(*layers)


class IPN(nn.Module):
    """IPN with constant ``channels`` per block and a small 2D head.

    Args:
        in_channels: volume channels (1 for OCTA).
        out_channels: 1 (sigmoid) or 2 (softmax) logits per en-face pixel.
        channels: feature channels of every 3D block (the paper keeps them constant).
        n_blocks: number of 3D blocks, each ending in a depth pooling.
        depth: nominal input depth, used to derive the pooling factors.
        batch_norm: BatchNorm after each conv.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: int = 16,
        n_blocks: int = 3,
        depth: int = 160,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("channels", channels),
            ("n_blocks", n_blocks),
            ("depth", depth),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.depth = depth
        self.pool_factors = depth_pool_factors(depth, n_blocks)
        blocks = []
        cin = in_channels
        for f in self.pool_factors:
            blocks.append(_Block3d(cin, channels, f, batch_norm))
            cin = channels
        self.blocks = nn.Sequential(*blocks)
        self.collapse = nn.AdaptiveMaxPool3d((1, None, None))
        head: list[nn.Module] = [nn.Conv2d(channels, channels, 3, padding=1, bias=not batch_norm)]
        if batch_norm:
            head.append(nn.BatchNorm2d(channels))
        head += [nn.ReLU(inplace=True), nn.Conv2d(channels, out_channels, 1)]
        self.head = nn.Sequential(*head)
        init_kaiming(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"IPN expects (N, C, D, H, W) input, got shape {tuple(x.shape)}")
        y = self.collapse(self.blocks(x))  # (N, channels, 1, H, W)
        return self.head(y.squeeze(2))
