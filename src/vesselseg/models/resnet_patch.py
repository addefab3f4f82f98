"""ResNet34-style patch classifier: is the centre pixel of this patch a vessel?

torchvision is not installed here, so the architecture is written out (He et al.
2016, BasicBlock x [3, 4, 6, 3]).  Module names follow torchvision exactly
(``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0`` ...), so an
ImageNet state dict saved by torchvision maps one-to-one onto the backbone and
:func:`load_imagenet_weights` only has to deal with ``conv1`` (channel count) and
``fc`` (replaced by a 1-logit head).  ``width`` scales every stage (64 = ResNet34)
so tests can use a tiny network.

Note:
    Input ``(N, in_channels, P, P)`` patches (any P >= 1: the pooling is adaptive);
    output ``(N, 1)`` logits for the centre pixel.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from vesselseg.errors import DataError
from vesselseg.models.unet import init_kaiming

log = logging.getLogger(__name__)

__all__ = ["BasicBlock", "ResNetPatch", "load_imagenet_weights"]


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or 1x1-projected) shortcut."""

    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNetPatch(nn.Module):
    """ResNet (BasicBlock) backbone + global average pool + one logit.

    Args:
        in_channels: patch channels (1 grey/green, 3 RGB).
        width: channels of the first stage; stages have width x (1, 2, 4, 8).
        layers: blocks per stage; (3, 4, 6, 3) is ResNet34, (2, 2, 2, 2) ResNet18.
    """

    # the four stages, set with setattr in __init__ under torchvision's names
    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(self, in_channels: int = 1, width: int = 64, layers: Sequence[int] = (3, 4, 6, 3)) -> None:
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be an integer >= 1, got {width!r}")
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be an integer >= 1, got {in_channels!r}")
        layers = list(layers)
        if len(layers) != 4 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in layers):
            raise ValueError(f"layers must be 4 integers >= 1, got {layers!r}")
        self.width = width
        self.layers = tuple(layers)
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = width
        for i, n in enumerate(layers):
            cout = width * 2**i
            blocks = [BasicBlock(cin, cout, stride=1 if i == 0 else 2)]
            blocks += [BasicBlock(cout, cout) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = cout
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, 1)
        init_kaiming(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"ResNetPatch expects (N, C, H, W) patches, got shape {tuple(x.shape)}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def load_imagenet_weights(model: ResNetPatch, path: Path | str) -> list[str]:
    """Load a torchvision-format ResNet state dict into ``model``'s backbone.

    Every backbone tensor must be present with the right shape (strict), so a
    ResNet18 file or a ``width != 64`` model fails loudly instead of half-loading.
    ``fc.*`` is skipped (ImageNet has 1000 classes, we have 1 logit).  For
    ``in_channels != 3`` the RGB ``conv1`` filters are averaged over colour and
    repeated, scaled by ``3 / in_channels`` so activations keep their magnitude (the
    usual trick for grey-scale fine-tuning).  A ``module.`` prefix (DataParallel)
    and a ``{"state_dict": ...}`` wrapper are accepted.  Returns the skipped keys.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: ImageNet weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DataError(
            f"{path}: not a readable torch state dict ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"{path}: expected a torchvision state dict (name -> tensor), got {type(state).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items()}

    own = model.state_dict()
    skipped = [k for k in state if k.startswith("fc.")]
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("fc."):
            continue
        if key == "conv1.weight" and key in own and value.ndim == 4 and value.shape[1] == 3 != own[key].shape[1]:
            c = own[key].shape[1]
            value = value.mean(dim=1, keepdim=True).repeat(1, c, 1, 1) * (3.0 / c)
        mapped[key] = value

    backbone = [k for k in own if not k.startswith("fc.")]
    # Checkpoints saved before PyTorch 0.4.1 have no BN step counters; they are
    # bookkeeping, not weights, so their absence is not a mismatch.
    missing = [k for k in backbone if k not in mapped and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in mapped if k not in own]
    shapes = [
        f"{k}: file {tuple(mapped[k].shape)} vs model {tuple(own[k].shape)}"
        for k in backbone
        if k in mapped and mapped[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:3])})")
        raise DataError(
            f"{path}: does not fit the ResNetPatch backbone (width={model.width}, layers={list(model.layers)}): "
            + ", ".join(parts)
        )
    model.load_state_dict(mapped, strict=False)
    log.info("loaded ImageNet backbone weights from %s (%d tensors, skipped %s)", path, len(mapped), skipped)
    return skipped
