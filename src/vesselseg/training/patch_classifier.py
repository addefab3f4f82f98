"""The ``resnet-patch`` recipe: a ResNet34 classifier of each patch's centre pixel.

Training reuses the U-Net trainer's pieces: the patches of ``data/patches``
(:func:`vesselseg.patches.load_patches`), their seeded order and online flips
(:class:`~vesselseg.training.batches.PatchBatches`), and the optimizer, scheduler,
AMP, DDP and checkpoint state of :class:`~vesselseg.training.loop.Trainer`.  Only
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
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.interpolate import RegularGridInterpolator
from tqdm import tqdm

from vesselseg import atomic, io
from vesselseg.errors import DataError, ParamsError
from vesselseg.layout import PreparedDataset
from vesselseg.params import ModelParams, TrainParams
from vesselseg.patches import crop, load_patches

log = logging.getLogger(__name__)

__all__ = ["CentreBatches", "fit_patch_classifier", "grid_stride", "predict_patch_classifier", "predict_probability_map"]

HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_dice", "val_iou", "lr", "seconds"]


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


def _centre_targets(labels: np.ndarray, fov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c = labels.shape[1] // 2
    return np.asarray(labels[:, c, c], dtype=np.float32), np.asarray(fov[:, c, c], dtype=np.float32)


@torch.inference_mode()
def _validate(trainer: Any, images: np.ndarray, labels: np.ndarray, fov: np.ndarray, *, batch_size: int,
              threshold: float) -> dict[str, float]:
    """Masked BCE, Dice and IoU of the centre pixels of the validation patches."""
    from vesselseg.metrics import confusion, scores_from_confusion
    from vesselseg.normalize import batch_to_input

    model = trainer.raw_model
    model.eval()
    y, m = _centre_targets(labels, fov)
    probs = np.empty(len(images), np.float32)
    loss_sum = 0.0
    for s in range(0, len(images), batch_size):
        x = torch.from_numpy(batch_to_input(images[s : s + batch_size])).to(trainer.device)
        logits = model(x).float().cpu()
        yt, mt = torch.from_numpy(y[s : s + batch_size])[:, None], torch.from_numpy(m[s : s + batch_size])[:, None]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, yt, reduction="none")
        loss_sum += float((loss * mt).sum())
        probs[s : s + batch_size] = torch.sigmoid(logits[:, 0]).numpy()
    inside = m > 0
    tp, fp, fn, tn = confusion(probs >= threshold, y > 0.5, inside)
    scores = scores_from_confusion(tp, fp, fn, tn)
    return {"val_loss": loss_sum / max(float(inside.sum()), 1.0), "dice": float(scores["dice"]), "iou": float(scores["iou"])}


def fit_patch_classifier(
    *,
    model: ModelParams,
    train: TrainParams,
    seed: int,
    prepared_dir: Path,
    patch_dir: Path,
    model_path: Path,
    checkpoint_path: Path,
    history_path: Path,
    metrics_path: Path,
    logger: Any = None,
    model_extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train the centre-pixel classifier on the patches; keep the best epoch; resume after a kill.

    ``train.loss`` must be ``bce`` (one logit per patch).  ``model.resnet_patch.weights``
    names a torchvision ResNet34 state dict to start from (ImageNet), else the
    network starts from scratch.  Writes the same model, history and metrics files
    as the U-Net trainer; the model's ``extra`` holds ``patch_size``, which predict needs.
    """
    from vesselseg.models import build_model, count_parameters
    from vesselseg.models.resnet_patch import load_imagenet_weights
    from vesselseg.training import checkpoint as ckpt
    from vesselseg.training.batches import PatchBatches
    from vesselseg.training.loop import Trainer, run_epochs, setup_runtime

    if model.name != "resnet_patch":
        raise ParamsError(f"model.name: the patch classifier trains 'resnet_patch', got {model.name!r}")
    if train.loss != "bce":
        raise ParamsError(f"train.loss: the patch classifier has one logit per patch and needs 'bce', got {train.loss!r}")
    t0 = time.monotonic()
    device, threads, world = setup_runtime(train, seed)
    tr_images, tr_labels, tr_fov = load_patches(patch_dir, "train")
    va_images, va_labels, va_fov = load_patches(patch_dir, "val")
    size = int(tr_images.shape[1])
    channels = 1 if tr_images.ndim == 3 else int(tr_images.shape[-1])
    if channels != model.in_channels:
        raise ParamsError(f"model.in_channels={model.in_channels} but the patches have {channels} channel(s)")
    PreparedDataset(prepared_dir)  # fails early, naming split.json, when prepare has not run
    config = model.network_config()
    net = build_model(config)
    if model.resnet_patch.weights:
        load_imagenet_weights(net, Path(model.resnet_patch.weights).expanduser())
    n_params = count_parameters(net)
    batches = CentreBatches(
        PatchBatches(tr_images, tr_labels, tr_fov, batch_size=train.batch_size, flip=train.flip,
                     rotate90=train.rotate90, seed=seed, rank=world.rank, world=world.size,
                     pin_memory=device.type == "cuda"),
        size,
    )
    from vesselseg.losses import build_loss

    trainer = Trainer(model=net, model_config=config, loss_fn=build_loss("bce"), params=train, seed=seed,
                      device=device, world=world, steps_per_epoch=len(batches))
    fp = ckpt.fingerprint({"model": config, "weights": model.resnet_patch.weights, "seed": seed, "size": size,
                           "train": train.model_dump(exclude={"threads", "device"}), "n_train": len(tr_images),
                           "n_val": len(va_images), "world": world.size, "kind": "patch_classifier"})
    state = ckpt.load_checkpoint(checkpoint_path, fp)
    if state is not None:
        trainer.restore(state)
        log.info("resuming from %s at epoch %d", checkpoint_path, trainer.start_epoch)
    log.info("training resnet_patch (%d params, %dx%d patches) on %s, %d threads: %d train / %d val patches",
             n_params, size, size, device, threads, len(tr_images), len(va_images))

    def validate(epoch: int) -> dict[str, float]:
        v = _validate(trainer, va_images, va_labels, va_fov, batch_size=train.batch_size,
                      threshold=train.val_threshold)
        return {"loss": v["val_loss"], "dice": v["dice"], "iou": v["iou"]}

    return run_epochs(
        trainer, batches, validate, params=train, fingerprint=fp, t0=t0, model_config=config, n_params=n_params,
        model_path=model_path, checkpoint_path=checkpoint_path, history_path=history_path,
        metrics_path=metrics_path, logger=logger,
        model_extra={**(model_extra or {}), "patch_size": size, "target": "centre_pixel"},
        extra_metrics={"patch_size": size},
    )


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
    mode = "reflect" if min(h, w) > pad else "symmetric"
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


def predict_patch_classifier(
    *,
    model_path: Path,
    prepared_dir: Path,
    out_dir: Path,
    device: str,
    window: int | None,
    overlap: float,
    weighting: str,
    batch_size: int,
    threshold: float,
    splits: tuple[str, ...] = ("val", "test"),
    channels_last: bool = True,
) -> dict[str, Any]:
    """Probability maps and masks of the val/test images, in the U-Net predictor's layout.

    ``window`` only sets the grid stride (:func:`grid_stride`); ``overlap`` and
    ``weighting`` (sliding-window blending) do not apply to a centre classifier and
    are ignored.  The whole ``out_dir`` is swapped in atomically.
    """
    from vesselseg.device import resolve_device, to_channels_last
    from vesselseg.models import load_model

    if not 0.0 < float(threshold) < 1.0:
        raise ParamsError(f"predict.threshold must be > 0 and < 1, got {threshold!r}")
    dev = resolve_device(device)
    model, meta = load_model(model_path, map_location="cpu")
    if meta["config"].get("name") != "resnet_patch":
        raise DataError(f"{model_path}: holds a {meta['config'].get('name')!r} model, not resnet_patch")
    patch_size = int((meta.get("extra") or {}).get("patch_size", 0))
    if patch_size < 1:
        raise DataError(f"{model_path}: the model file does not record its training patch_size")
    model = model.to(dev)
    channels_last = channels_last and to_channels_last(model)
    stride = grid_stride(window, patch_size)
    dataset = PreparedDataset(prepared_dir)
    log.info("patch classifier: %dx%d patches, centres every %d px (predict.window %s), on %s",
             patch_size, patch_size, stride, window, dev)
    t0 = time.monotonic()
    counts: dict[str, int] = {}
    with atomic.atomic_dir(out_dir) as tmp:
        for split in splits:
            (tmp / split / "probs").mkdir(parents=True)
            (tmp / split / "masks").mkdir(parents=True)
            ids = dataset.ids(split)
            for id_ in tqdm(ids, desc=f"resnet_patch {split}", unit="img", disable=None):
                image = io.read_image(dataset.paths(id_)[0])
                ch = 1 if image.ndim == 2 else image.shape[2]
                if ch != int(meta["config"].get("in_channels", 1)):
                    raise DataError(f"{dataset.paths(id_)[0]}: image has {ch} channel(s), the model expects "
                                    f"{meta['config'].get('in_channels')} (model.in_channels)")
                probs = predict_probability_map(model, image, patch_size=patch_size, stride=stride,
                                                batch_size=batch_size, device=dev, channels_last=channels_last)
                atomic.write_npy(tmp / split / "probs" / f"{id_}.npy", probs)
                io.write_png(tmp / split / "masks" / f"{id_}.png", probs >= threshold)
            counts[split] = len(ids)
    seconds = time.monotonic() - t0
    return {"n_images": sum(counts.values()), "seconds_total": round(seconds, 2), "stride": stride, "splits": counts}
