"""A 2D U-Net (Ronneberger et al. 2015) sized for CPU training on small patches.

``depth`` is the number of down-sampling (2x2 max-pool) levels: ``depth=3`` means the
bottleneck sees the input at 1/8 of its size, and the network has ``depth + 1``
resolution levels.  Channels double per level (``base_channels * 2**level``).

Two padding conventions are offered because both appear in the literature and they
change how inference must be done:

* ``"same"``: 3x3 convs are zero-padded, so every level keeps its size.  Inputs of any
  size are accepted: the forward pass reflect-pads height and width up to a multiple
  of ``2**depth`` (bottom/right only) and crops the logits back, so the output always
  has the input's size.
* ``"valid"``: convs are unpadded, as in the original paper.  Each double conv loses
  two pixels per side, skip connections are centre-cropped to the decoder's size, and
  the output is smaller than the input.  :meth:`UNet.output_size` and
  :meth:`UNet.input_size_for` give the exact arithmetic, and
  :func:`valid_padding_predictor` wraps a model so that the output matches the input
  (what sliding-window inference wants).

``stacks=2`` makes it a W-Net (Galdran et al., "State-of-the-art retinal vessel
segmentation with minimalistic models", Sci. Rep. 2022): a second U-Net of the same
shape reads the image together with the first one's vessel probabilities and
refines them, so the second pass sees a whole first guess of the tree (where a
vessel continues, how wide its neighbours are) that a single pass has to infer from
pixels.  In training mode a stacked net returns every stage's logits, final first,
so that each stage is supervised (the paper's loss on both outputs); in eval mode it
returns the final logits only, so prediction, export and TTA see one tensor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal, TypedDict

import torch
import torch.nn.functional as F
from torch import nn

from vesselseg.models.probability import foreground_probability

log = logging.getLogger(__name__)

__all__ = ["UNet", "init_kaiming", "reflect_pad", "valid_padding_predictor"]

Upsampling = Literal["bilinear", "transpose"]
Padding = Literal["same", "valid"]
Size = int | tuple[int, int]


def init_kaiming(module: nn.Module) -> None:
    """Kaiming-normal conv weights (fan_out, ReLU), zero biases, unit BN.

    PyTorch's default (Kaiming-uniform with a=sqrt(5)) shrinks activations through
    deep ReLU stacks; fan_out Kaiming keeps the variance of gradients stable, as
    torchvision's ResNet and most U-Net code do.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def reflect_pad(x: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
    """Reflect-pad (left, right, top, bottom), repeating the reflection if needed.

    ``F.pad(mode="reflect")`` refuses a pad as large as the image; valid-padding
    U-Nets need margins of ~40 px, larger than a small tile, so pad in steps.
    """
    left, right, top, bottom = pad
    while left or right or top or bottom:
        h, w = x.shape[-2:]
        step = (min(left, w - 1), min(right, w - 1), min(top, h - 1), min(bottom, h - 1))
        if step == (0, 0, 0, 0):  # 1-pixel image: reflection is undefined
            return F.pad(x, (left, right, top, bottom), mode="replicate")
        x = F.pad(x, step, mode="reflect")
        left, right, top, bottom = (a - b for a, b in zip((left, right, top, bottom), step, strict=True))
    return x


def _center_crop(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    top = (x.shape[-2] - h) // 2
    left = (x.shape[-1] - w) // 2
    return x[..., top : top + h, left : left + w]


class _BlockKwargs(TypedDict):
    """The keywords :class:`UNet` passes to every :class:`DoubleConv` and :class:`Up`."""

    batch_norm: bool
    dropout: float
    padding: int


class DoubleConv(nn.Sequential):
    """conv-BN-ReLU, optional dropout, conv-BN-ReLU (the retina-unet block)."""

    def __init__(self, cin: int, cout: int, *, batch_norm: bool, dropout: float, padding: int) -> None:
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(((cin, cout), (cout, cout))):
            layers.append(nn.Conv2d(a, b, 3, padding=padding, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(b))
            layers.append(nn.ReLU(inplace=True))
            if i == 0 and dropout > 0:
                layers.append(nn.Dropout(dropout))
        super().__init__(*layers)


class Up(nn.Module):
    """Double the resolution and halve the channels, then merge the skip."""

    def __init__(self, cin: int, *, upsampling: Upsampling, batch_norm: bool, dropout: float, padding: int) -> None:
        super().__init__()
        cout = cin // 2
        if upsampling == "transpose":
            self.up: nn.Module = nn.ConvTranspose2d(cin, cout, kernel_size=2, stride=2)
        else:
            # Interpolation has no weights; the 1x1 conv halves the channels so the
            # concatenation with the skip has the same width as with a transpose conv.
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(cin, cout, kernel_size=1),
            )
        self.conv = DoubleConv(2 * cout, cout, batch_norm=batch_norm, dropout=dropout, padding=padding)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        if skip.shape[-2:] != x.shape[-2:]:
            skip = _center_crop(skip, *x.shape[-2:])
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """U-Net returning logits ``(N, out_channels, H', W')``.

    Args:
        in_channels: image channels (1 for a green/grey channel, 3 for RGB).
        out_channels: 1 for a sigmoid/BCE head, 2 for a softmax/CE head.
        depth: number of down-sampling levels (>= 1).
        base_channels: channels of the first level; doubled at every level.
        batch_norm: BatchNorm after each conv (convs then have no bias).
        dropout: dropout probability between the two convs of every block (0 = off).
        upsampling: {"bilinear", "transpose"}: bilinear + 1x1 conv, or ConvTranspose2d(2, 2).
        padding: {"same", "valid"}; see the module docstring.
        input_norm: per-sample, per-channel standardisation of the input (a layer).
        stacks: U-Nets in sequence (2 = W-Net); each after the first reads the image
            plus the previous stage's vessel probability.  Only with ``padding="same"``.

    Note:
        Input is ``(N, in_channels, H, W)`` float.  With ``padding="same"`` H' = H and
        W' = W for any size; with ``"valid"`` use :meth:`output_size`.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        depth: int = 3,
        base_channels: int = 16,
        batch_norm: bool = True,
        dropout: float = 0.1,
        upsampling: Upsampling = "bilinear",
        padding: Padding = "same",
        input_norm: bool = False,
        stacks: int = 1,
    ) -> None:
        super().__init__()
        _check_int("in_channels", in_channels, 1)
        _check_int("stacks", stacks, 1)
        _check_int("out_channels", out_channels, 1)
        _check_int("depth", depth, 1)
        _check_int("base_channels", base_channels, 1)
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if upsampling not in ("bilinear", "transpose"):
            raise ValueError(f"upsampling must be one of ['bilinear', 'transpose'], got {upsampling!r}")
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be one of ['same', 'valid'], got {padding!r}")
        if stacks > 1 and padding != "same":
            raise ValueError("stacks > 1 needs padding 'same' (a valid-padding stage shrinks the image it refines)")
        self.depth = depth
        self.padding = padding
        # Per-sample, per-channel standardisation inside the net (the patches-unet3
        # recipe's "normalise each patch"): being a layer, it applies identically to
        # training patches and to every sliding window at prediction time.
        self.input_norm: nn.Module = nn.InstanceNorm2d(in_channels, affine=False) if input_norm else nn.Identity()
        conv_pad = 1 if padding == "same" else 0
        kw: _BlockKwargs = {"batch_norm": batch_norm, "dropout": float(dropout), "padding": conv_pad}
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.inc = DoubleConv(in_channels, widths[0], **kw)
        self.downs = nn.ModuleList(DoubleConv(widths[i], widths[i + 1], **kw) for i in range(depth))
        self.ups = nn.ModuleList(Up(widths[i + 1], upsampling=upsampling, **kw) for i in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], out_channels, kernel_size=1)
        init_kaiming(self)
        # Built after init_kaiming so that a single U-Net draws its weights exactly as
        # before stacking existed (same seed, same network, same metrics).
        self.refine: UNet | None = None
        if stacks > 1:
            self.refine = UNet(
                in_channels=in_channels + 1,  # the image plus the previous stage's probability
                out_channels=out_channels,
                depth=depth,
                base_channels=base_channels,
                batch_norm=batch_norm,
                dropout=dropout,
                upsampling=upsampling,
                padding=padding,
                input_norm=input_norm,
                stacks=stacks - 1,
            )

    @property
    def n_params(self) -> int:
        """Number of parameters (what train's metrics.json reports)."""
        return sum(p.numel() for p in self.parameters())

    # -- forward ---------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Logits; for a stacked net in training mode, every stage's logits (final first)."""
        if x.ndim != 4:
            raise ValueError(f"UNet expects (N, C, H, W) input, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if self.padding == "same":
            # Padded once for all stages: a later stage then refines the first one's
            # own border predictions (not their reflection), and the exported graph,
            # which pads in its wrapper (vesselseg.export), computes the same thing.
            m = 2**self.depth
            ph, pw = (-h) % m, (-w) % m
            if ph or pw:
                x = reflect_pad(x, (0, pw, 0, ph))
        else:
            self.output_size((h, w))  # raises a clear ValueError for impossible sizes
        stages = self._stages(x)
        if self.padding == "same":
            stages = [y[..., :h, :w] for y in stages]
        if len(stages) == 1 or not self.training:
            return stages[-1]
        return tuple(reversed(stages))

    def _stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every stage's logits on an input the network's size arithmetic accepts, first stage first."""
        y = self._network(x)
        if self.refine is None:
            return [y]
        return [y, *self.refine._stages(torch.cat([x, foreground_probability(y)], dim=1))]

    def _network(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_norm(x)
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(F.max_pool2d(skips[-1], 2)))
        y = skips.pop()
        for up in self.ups:
            y = up(y, skips.pop())
        return self.head(y)

    # -- size arithmetic -------------------------------------------------------
    def output_size(self, input_size: Size) -> Size:
        """Output size for ``input_size`` (an int or (H, W)); ValueError if impossible.

        For ``"valid"`` every feature map before a pooling must have an even size,
        otherwise the skip connection and the upsampled map cannot be aligned.
        """
        if isinstance(input_size, tuple):
            return tuple(self._output_1d(int(s)) for s in input_size)  # type: ignore[return-value]
        return self._output_1d(int(input_size))

    def _output_1d(self, s: int) -> int:
        if self.padding == "same":
            return s
        orig = s
        for _ in range(self.depth):
            s -= 4
            if s <= 0 or s % 2:
                raise ValueError(
                    f"input size {orig} does not fit a valid-padding U-Net of depth {self.depth} "
                    f"(use UNet.input_size_for to pick one)"
                )
            s //= 2
        s -= 4
        if s <= 0:
            raise ValueError(f"input size {orig} is too small for a valid-padding U-Net of depth {self.depth}")
        for _ in range(self.depth):
            s = 2 * s - 4
        return s

    def input_size_for(self, output_size: Size) -> Size:
        """Smallest valid input size whose output is at least ``output_size``."""
        if isinstance(output_size, tuple):
            return tuple(self._input_for_1d(int(s)) for s in output_size)  # type: ignore[return-value]
        return self._input_for_1d(int(output_size))

    def _input_for_1d(self, out: int) -> int:
        if out < 1:
            raise ValueError(f"output size must be >= 1, got {out}")
        if self.padding == "same":
            return out
        # Walk back from the bottleneck: its size b gives input b*2**d + 4*(2**(d+1) - 1)
        # (each level adds 4 and doubles) and output b*2**d - 4*(2**d - 1).
        d = self.depth
        step = 2**d
        b = max(1, -(-(out + 4 * (step - 1)) // step))
        return b * step + 4 * (2 ** (d + 1) - 1)

    def margin(self, input_size: int) -> int:
        """Pixels lost on each side: ``(input - output) / 2`` (0 for "same")."""
        return (input_size - self._output_1d(input_size)) // 2


def valid_padding_predictor(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable ``(N, C, H, W) -> (N, out, H, W)`` whatever the model's padding.

    For a ``"valid"`` U-Net the input is reflect-padded by the network's margin (plus
    whatever rounds it up to a valid size) and the logits are cropped so that output
    pixel (i, j) is the prediction for input pixel (i, j).  Other models are returned
    unchanged, so sliding-window code can always wrap its model.

    The reflected border only influences outputs within ``margin + 2**depth - 1``
    pixels of the image edge (pooling phases widen the receptive field a little
    beyond the margin); deeper inside, the result equals a forward pass over a
    larger image.
    """
    if not isinstance(model, UNet) or model.padding != "valid":
        return model

    def predict(x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pads = []
        crops = []
        for s in (h, w):
            s_in = model._input_for_1d(s)
            s_out = model._output_1d(s_in)
            m = (s_in - s_out) // 2
            extra = s_out - s
            before = m + extra // 2
            pads.append((before, s_in - s - before))
            crops.append(extra // 2)
        (top, bottom), (left, right) = pads
        y = model(reflect_pad(x, (left, right, top, bottom)))
        return y[..., crops[0] : crops[0] + h, crops[1] : crops[1] + w]

    return predict


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
