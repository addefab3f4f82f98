"""The ResNet patch family (``resnet_patch``): a ResNet34 classifier of each patch's centre pixel.

Training reuses the U-Net trainer's pieces: the patches of ``data/patches``
(:func:`vesselseg.patches.load_patches`), their seeded order and online flips
(:class:`~vesselseg.training.batches.PatchBatches`), and the optimizer, scheduler,
AMP, DDP and checkpoint state of the shared :class:`~vesselseg.training.loop.Trainer`.  Only
the target differs: the label of the centre pixel ``(size // 2, size // 2)`` of
each patch, weighted by whether that pixel lies inside the FOV.  The patch stage's
``foreground`` sampling centres half of the patches on vessels, so the classes are
about balanced (the probabilities are calibrated to that prior, not to the ~10 %
vessel share of an image).

Validation, every epoch, scores the centre pixels of the validation patches (loss,
Dice, IoU at ``train.val_threshold``): a dense map of the validation images would
cost a forward per pixel.  The best epoch by ``train.select_metric`` is kept.

Prediction: one forward per pixel is ~330k forwards per DRIVE image, far too slow
on a CPU, so :func:`predict_probability_map` classifies a grid of centres every
``stride = max(1, predict.window // 8)`` pixels (a quarter of the patch size when
``predict.window`` is null; the last row and column are always on the grid) and interpolates the probabilities bilinearly to full resolution.
The image is reflect-padded so border centres get a full patch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
from scipy.interpolate import RegularGridInterpolator

from vesselseg import imagefiles
from vesselseg.errors import DataError, ParamsError
from vesselseg.families import base
from vesselseg.families.base import NetworkFamily, Predictor, TrainingData, TrainJob
from vesselseg.inference.tta import predict_with_tta
from vesselseg.params import ModelParams, PredictParams
from vesselseg.patches import crop
from vesselseg.prepared import PreparedDataset

log = logging.getLogger(__name__)

__all__ = ["FAMILY", "CentreBatches", "ResNetPatchFamily", "grid_stride", "predict_probability_map"]


def grid_stride(window: int | None, patch_size: int) -> int:
    """Spacing of the classified centres at prediction: ``max(1, window // 8)``.

    ``predict.window: null`` (whole images for the U-Net) has no window to derive it
    from: then a quarter of the training patch size.
    """
    if window is None:
        return max(1, int(patch_size) // 4)
    return max(1, int(window) // 8)


class CentreBatches:
    """:class:`PatchBatches` with targets reduced to the centre pixel: ``(x, y (N, 1), fov (N, 1))``."""

    def __init__(self, batches: Any, size: int) -> None:
        self.batches = batches
        self.c = size // 2

    def __len__(self) -> int:
        return len(self.batches)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        c = self.c
        for x, y, m in self.batches.epoch(epoch):
            yield x, y[:, :, c, c], m[:, :, c, c]


@torch.inference_mode()
def predict_probability_map(
    model: torch.nn.Module,
    image: np.ndarray,
    *,
    patch_size: int,
    stride: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
) -> np.ndarray:
    """Vessel probability float32 ``(H, W)`` in [0, 1] from centres on a ``stride`` grid.

    ``channels_last``: the model's weights are NHWC (:func:`vesselseg.device.to_channels_last`),
    so patches are handed over in that layout too.

    Grid rows are ``0, stride, 2 stride, ...`` plus ``H - 1`` (columns alike); the
    patch of centre ``(r, c)`` is the one training used: rows ``r - size // 2`` to
    ``r - size // 2 + size`` of the reflect-padded image.  Between grid points the
    probability is bilinear.
    """
    from vesselseg.normalize import batch_to_input

    if stride < 1 or patch_size < 1 or batch_size < 1:
        raise ParamsError(f"stride, patch_size and batch_size must be >= 1, got {stride}, {patch_size}, {batch_size}")
    h, w = image.shape[:2]
    if h < 2 or w < 2:
        raise DataError(f"image of {h}x{w} pixels is too small for a grid of patch centres (at least 2x2)")
    pad = patch_size
    widths = ((pad, pad), (pad, pad)) + (((0, 0),) if image.ndim == 3 else ())
    mode: Literal["reflect", "symmetric"] = "reflect" if min(h, w) > pad else "symmetric"
    padded = np.pad(image, widths, mode=mode)
    rows = np.unique(np.append(np.arange(0, h, stride), h - 1))
    cols = np.unique(np.append(np.arange(0, w, stride), w - 1))
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    corners = np.stack([rr.ravel(), cc.ravel()], axis=1) + (pad - patch_size // 2)
    dev = torch.device(device)
    model.eval()
    out = np.empty(len(corners), np.float32)
    for s in range(0, len(corners), batch_size):
        patches = crop(padded, corners[s : s + batch_size], patch_size)
        x = torch.from_numpy(batch_to_input(patches)).to(dev)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out[s : s + batch_size] = torch.sigmoid(model(x)[:, 0].float()).cpu().numpy()
    grid = out.reshape(len(rows), len(cols)).astype(np.float64)
    interp = RegularGridInterpolator((rows, cols), grid, method="linear")
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    full = interp(np.stack([yy.ravel(), xx.ravel()], axis=1)).reshape(h, w)
    return np.clip(full, 0.0, 1.0).astype(np.float32)


class CentrePredictor(Predictor):
    """Classifies a grid of centres and interpolates (see the module docstring)."""

    def __init__(
        self,
        model: torch.nn.Module,
        meta: dict[str, Any],
        predict: PredictParams,
        device: torch.device,
        patch_size: int,
    ) -> None:
        from vesselseg.device import to_channels_last

        super().__init__(device=str(device))
        self.model, self.predict, self.torch_device, self.patch_size = model, predict, device, patch_size
        self.in_channels = int(meta["config"].get("in_channels", 1))
        self.channels_last = predict.channels_last and to_channels_last(model)
        # predict.window only sets the grid stride; overlap and weighting (window
        # blending) do not apply to a centre classifier
        self.stride = grid_stride(predict.window, patch_size)
        self.stats = {"stride": self.stride, "patch_size": patch_size}

    def __call__(self, dataset: PreparedDataset, id_: str) -> np.ndarray:
        path = dataset.paths(id_)[0]
        image = imagefiles.read_image(path)
        base.check_image_channels(path, image, self.in_channels)
        return self.predict_image(image)

    def predict_image(self, image: np.ndarray) -> np.ndarray:
        def one(im: np.ndarray) -> np.ndarray:
            return predict_probability_map(
                self.model,
                im,
                patch_size=self.patch_size,
                stride=self.stride,
                batch_size=self.predict.batch_size,
                device=self.torch_device,
                channels_last=self.channels_last,
            )

        return predict_with_tta(one, image, self.predict.tta)


class ResNetPatchFamily(NetworkFamily):
    """``train.loss`` is ``bce`` (one logit per patch; a schema rule).  ``model.resnet_patch.weights``
    names a torchvision ResNet34 state dict to start from (ImageNet), else the network
    starts from scratch.  The model file's ``extra`` holds ``patch_size``, which predict needs."""

    name = "resnet_patch"

    def network_config(self, model: ModelParams) -> dict[str, Any]:
        return {"name": self.name, "in_channels": model.in_channels, "width": model.resnet_patch.width}

    def init_weights(self, net: torch.nn.Module, model: ModelParams) -> None:
        from vesselseg.models.resnet_patch import ResNetPatch, load_imagenet_weights

        if model.resnet_patch.weights:
            # net was built from this family's network_config, so it is a ResNetPatch
            load_imagenet_weights(cast(ResNetPatch, net), Path(model.resnet_patch.weights).expanduser())

    def load_data(self, job: TrainJob, *, rank: int, world: int, pin_memory: bool) -> TrainingData:
        from vesselseg.patches import load_patches

        p = job.params
        tr_images, tr_labels, tr_fov = load_patches(job.patch_dir, "train")
        va_images, va_labels, va_fov = load_patches(job.patch_dir, "val")
        size = int(tr_images.shape[1])
        base.require_channels("patches", 1 if tr_images.ndim == 3 else int(tr_images.shape[-1]), p.model)
        PreparedDataset(job.prepared_dir)  # fails early, naming split.json, when prepare has not run
        batches = CentreBatches(
            base.patch_batches(p, (tr_images, tr_labels, tr_fov), rank=rank, world=world, pin_memory=pin_memory),
            size,
        )
        c = size // 2
        return TrainingData(
            batches=batches,
            fingerprint={
                "weights": p.model.resnet_patch.weights,
                "size": size,
                "n_train": len(tr_images),
                "n_val": len(va_images),
                "kind": "patch_classifier",
            },
            description=f"{size}x{size} patches, {len(tr_images)} train / {len(va_images)} val",
            state={
                "images": va_images,
                "y": np.asarray(va_labels[:, c, c], dtype=np.float32),
                "m": np.asarray(va_fov[:, c, c], dtype=np.float32),
            },
            model_extra={"patch_size": size, "target": "centre_pixel"},
            extra_metrics={"patch_size": size},
        )

    @torch.inference_mode()
    def validate(self, trainer: Any, data: TrainingData, epoch: int) -> dict[str, float]:
        """Masked BCE, Dice and IoU of the centre pixels of the validation patches.

        A dense map of the validation images would cost a forward per pixel.
        """
        from vesselseg.normalize import batch_to_input

        images, y, m = data.state["images"], data.state["y"], data.state["m"]
        bs = trainer.params.batch_size
        model = trainer.raw_model
        model.eval()
        probs = np.empty(len(images), np.float32)
        loss_sum = 0.0
        for s in range(0, len(images), bs):
            x = torch.from_numpy(batch_to_input(images[s : s + bs])).to(trainer.device)
            logits = model(x).float().cpu()
            yt, mt = torch.from_numpy(y[s : s + bs])[:, None], torch.from_numpy(m[s : s + bs])[:, None]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, yt, reduction="none")
            loss_sum += float((loss * mt).sum())
            probs[s : s + bs] = torch.sigmoid(logits[:, 0]).numpy()
        inside = m > 0
        scores = base.pooled_scores([(probs, y > 0.5, inside)], trainer.params.val_threshold)
        return {"loss": loss_sum / max(float(inside.sum()), 1.0), **scores}

    def load_predictor(self, model_path: Path, *, predict: PredictParams, device: str, amp: bool) -> Predictor:
        from vesselseg.device import resolve_device
        from vesselseg.models import load_model

        dev = resolve_device(device)
        model, meta = load_model(model_path, map_location="cpu")
        patch_size = int((meta.get("extra") or {}).get("patch_size", 0))
        if patch_size < 1:
            raise DataError(f"{model_path}: the model file does not record its training patch_size")
        log.info(
            "patch classifier: %dx%d patches, centres every %d px (predict.window %s), on %s",
            patch_size,
            patch_size,
            grid_stride(predict.window, patch_size),
            predict.window,
            dev,
        )
        return CentrePredictor(model.to(dev), meta, predict, dev, patch_size)


FAMILY = ResNetPatchFamily()
