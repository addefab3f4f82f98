"""Training the Image Projection Network on prepared OCTA volumes, block by block.

The IPN (:class:`vesselseg.models.ipn.IPN`) sees a whole A-scan column at once, so a
full-depth volume is its natural input; a full *en-face* extent is not needed, since
its receptive field over the en-face plane is small.  Training therefore cuts random
lateral blocks of ``model.ipn.block`` x ``block`` pixels at full (prepared) depth
from the training volumes, paired with the same block of the en-face label and FOV.

Memory scales with the blocks, not the volumes: the volumes are memory-mapped and
only the drawn blocks are read, and the activations the backward pass keeps are
about ``batch_size * channels * depth * block**2 * 4`` bytes per layer of the first
3D block (each later block divides ``depth`` by its pooling factor), times about six
saved tensors per block (two conv, two norm, two ReLU outputs).  Example: batch 8,
16 channels, depth 64, block 64 -> 134 MB per tensor, roughly 1 GB in all.  Lower
``model.ipn.block`` or ``train.batch_size`` to shrink it.

Everything else is the U-Net trainer's (:mod:`vesselseg.training.loop`), reused
rather than copied: the optimizer, schedulers, AMP, DDP wrapping, train step,
checkpoint state and the resume logic come from :class:`~vesselseg.training.loop.
Trainer`; this module adds the block source and validation on whole volumes with
the same sliding-window stitching as :mod:`vesselseg.inference.ipn_predict`, after
recomputing the BatchNorm statistics on the epoch's blocks (see
:meth:`IpnTrainer.refresh_batch_norm`: with few steps per epoch the running averages
trail the weights and eval-mode predictions collapse).

Determinism: the blocks (which volume, where, which flip/rotation) of epoch ``e``
are a pure function of ``(seed, e)``, and rank ``r`` of ``N`` takes ``blocks[r::N]``,
as :class:`~vesselseg.training.batches.PatchBatches` does for patches; dropout and
BN see the per-epoch torch seed of ``Trainer.train_epoch``.  A run resumed from the
checkpoint of epoch ``e - 1`` therefore continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vesselseg.errors import DataError, ParamsError
from vesselseg.inference.ipn_predict import VOLUMES_DIR, load_prepared_volume, predict_volume, volume_path, volume_to_input
from vesselseg.layout import PreparedDataset
from vesselseg.params import ModelParams, TrainParams
from vesselseg.training import checkpoint as ckpt
from vesselseg.training.loop import EpochLogger, Trainer, run_epochs, setup_runtime

log = logging.getLogger(__name__)

__all__ = ["VolumeBlocks", "VolumeItem", "fit_ipn", "load_volume_items"]

# logit clamp for the validation loss computed from stitched probabilities
_PROB_EPS = 1e-6


@dataclass(frozen=True)
class VolumeItem:
    id: str
    volume: np.ndarray  # uint8 (depth, H, W), memory-mapped
    label: np.ndarray  # bool (H, W)
    fov: np.ndarray  # bool (H, W)


def load_volume_items(dataset: PreparedDataset, split: str) -> list[VolumeItem]:
    """The split's volumes (memory-mapped) with their en-face labels and FOV masks."""
    items = []
    for id_ in dataset.ids(split):
        item = dataset.load(id_)
        vol = load_prepared_volume(volume_path(dataset.root, id_), item.label.shape)
        items.append(VolumeItem(id_, vol, item.label, item.fov))
    return items


class VolumeBlocks:
    """Random full-depth lateral blocks of training volumes, in batches.

    Written instead of a ``Dataset`` + ``DataLoader`` for the same reason as
    :class:`~vesselseg.training.batches.PatchBatches`: the epoch's blocks must be a
    pure function of ``(seed, epoch)`` shared by one process and N DDP ranks.  Flips
    and 90-degree rotations act on the two en-face axes of volume, label and FOV
    alike; as exact index permutations they are numpy views, so no augmentation
    library is needed.

    Each epoch draws ``blocks_per_volume`` blocks from every volume (``None``: enough
    to cover its en-face area once on average, ``ceil(H * W / block**2)``), top-left
    corners uniform over the positions where the block fits.
    """

    def __init__(
        self,
        items: list[VolumeItem],
        *,
        block: int,
        batch_size: int,
        flip: bool,
        rotate90: bool,
        seed: int,
        blocks_per_volume: int | None = None,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        if not items:
            raise DataError("no training volumes (the training split is empty)")
        if batch_size % world:
            raise ValueError(f"train.batch_size={batch_size} must be divisible by the number of processes ({world})")
        for it in items:
            h, w = it.volume.shape[1:]
            if block > min(h, w):
                raise ParamsError(
                    f"model.ipn.block={block} is larger than volume {it.id!r} ({h}x{w} en-face); "
                    f"lower it to at most {min(h, w)}"
                )
        if blocks_per_volume is not None and blocks_per_volume < 1:
            raise ParamsError(f"blocks_per_volume must be >= 1, got {blocks_per_volume}")
        self.items, self.block = items, block
        self.local_batch = batch_size // world
        self.flip, self.rotate90 = flip, rotate90
        self.seed, self.rank, self.world = seed, rank, world
        self.counts = [
            blocks_per_volume or max(1, math.ceil(it.volume.shape[1] * it.volume.shape[2] / block**2)) for it in items
        ]

    @property
    def n_blocks(self) -> int:
        return sum(self.counts)

    def __len__(self) -> int:
        per_rank = -(-self.n_blocks // self.world)
        return -(-per_rank // self.local_batch)

    def plan(self, epoch: int) -> np.ndarray:
        """This rank's blocks for ``epoch``: rows of (volume, top, left, flip_h, flip_w, rot90 k)."""
        rng = np.random.default_rng([self.seed, epoch])
        vols = np.repeat(np.arange(len(self.items)), self.counts)
        rng.shuffle(vols)
        heights = np.array([it.volume.shape[1] for it in self.items])[vols]
        widths = np.array([it.volume.shape[2] for it in self.items])[vols]
        n = len(vols)
        top = (rng.random(n) * (heights - self.block + 1)).astype(np.int64)
        left = (rng.random(n) * (widths - self.block + 1)).astype(np.int64)
        fh, fw = rng.integers(0, 2, n), rng.integers(0, 2, n)
        rot = rng.integers(0, 4, n)
        if not self.flip:
            fh[:], fw[:] = 0, 0
        if not self.rotate90:
            rot[:] = 0
        plan = np.stack([vols, top, left, fh, fw, rot], axis=1)
        return plan[self.rank :: self.world]

    def _cut(self, row: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        v, top, left, fh, fw, rot = (int(a) for a in row)
        it, k = self.items[v], self.block
        vol = np.asarray(it.volume[:, top : top + k, left : left + k])
        lab = it.label[top : top + k, left : left + k]
        fov = it.fov[top : top + k, left : left + k]
        if fh:
            vol, lab, fov = vol[:, ::-1], lab[::-1], fov[::-1]
        if fw:
            vol, lab, fov = vol[:, :, ::-1], lab[:, ::-1], fov[:, ::-1]
        if rot:
            vol, lab, fov = np.rot90(vol, rot, axes=(1, 2)), np.rot90(lab, rot), np.rot90(fov, rot)
        return vol, lab, fov

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(x float32 (b, 1, depth, k, k), label (b, 1, k, k), FOV (b, 1, k, k)) batches."""
        plan = self.plan(epoch)
        for start in range(0, len(plan), self.local_batch):
            cut = [self._cut(r) for r in plan[start : start + self.local_batch]]
            x = np.stack([volume_to_input(c[0]) for c in cut])[:, None]
            y = np.stack([c[1] for c in cut]).astype(np.float32)[:, None]
            m = np.stack([c[2] for c in cut]).astype(np.float32)[:, None]
            yield torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(m)


class IpnTrainer(Trainer):
    """The U-Net :class:`Trainer` with validation on whole volumes instead of patches."""

    @torch.no_grad()
    def refresh_batch_norm(self, batches: VolumeBlocks, epoch: int) -> None:
        """Recompute BatchNorm running statistics on this epoch's blocks with the final weights.

        With a few optimizer steps per epoch (a handful of blocks per volume), the
        running averages trail weights that moved a lot since they were collected,
        and eval mode then predicts nothing: measured on the synthetic volumes, val
        Dice 0.00 in eval mode against 0.82 in train mode after 28 steps, 0.85 after
        this refresh.  ``torch.optim.swa_utils.update_bn`` (reset, cumulative average
        over one pass, restore momentum and mode) does exactly this ("precise BN").
        It only touches BN buffers, which training never reads (batch statistics),
        so the training trajectory and its determinism are unchanged; the cost is
        one forward pass over the epoch's blocks.
        """
        from torch.optim.swa_utils import update_bn

        update_bn((x for x, _, _ in batches.epoch(epoch)), self.raw_model, device=self.device)

    @torch.inference_mode()
    def validate(self, items: list[VolumeItem]) -> dict[str, float]:
        """Validation loss and FOV-pooled Dice/IoU of the stitched validation maps.

        The loss is the training loss applied to the stitched probabilities turned
        back into logits (``logit(p)``, or ``[0, logit(p)]`` for two classes, whose
        softmax is ``p``), averaged over volumes: the loss of what predict writes.
        """
        from vesselseg.metrics import confusion, scores_from_confusion

        tp = fp = fn = tn = 0
        losses = []
        for it in items:
            h, w = it.label.shape
            window = self.params.val_window or (h, w)
            probs = predict_volume(
                self.raw_model, np.asarray(it.volume), window=window, overlap=self.params.val_overlap,
                weighting="gaussian", batch_size=self.params.batch_size, device=self.device, amp=self.amp is not None,
            )
            c = confusion(probs >= self.params.val_threshold, it.label, it.fov)
            tp, fp, fn, tn = tp + c[0], fp + c[1], fn + c[2], tn + c[3]
            z = torch.logit(torch.from_numpy(probs).clamp(_PROB_EPS, 1 - _PROB_EPS))[None, None]
            logits = torch.cat([torch.zeros_like(z), z], dim=1) if self.two_class else z
            y = torch.from_numpy(it.label.astype(np.float32))[None, None]
            m = torch.from_numpy(it.fov.astype(np.float32))[None, None]
            losses.append(float(self._loss(logits, y, m)))
        s = scores_from_confusion(tp, fp, fn, tn)
        return {"loss": float(np.mean(losses)), "dice": float(s["dice"]), "iou": float(s["iou"])}


def _check_volumes(prepared_dir: Path, dataset: PreparedDataset) -> None:
    if not (Path(prepared_dir) / VOLUMES_DIR).is_dir():
        raise ParamsError(
            f"{Path(prepared_dir) / VOLUMES_DIR}: no prepared volumes; model.name 'ipn' needs prepare.volumes: true "
            "and a volume dataset (run the prepare stage again)"
        )
    if not dataset.ids("val"):
        raise DataError(f"{prepared_dir}/split.json: the validation split is empty (raise data.val_fraction)")


def fit_ipn(
    *,
    model: ModelParams,
    train: TrainParams,
    seed: int,
    prepared_dir: Path,
    model_path: Path,
    checkpoint_path: Path,
    history_path: Path,
    metrics_path: Path,
    logger: EpochLogger | None = None,
    model_extra: dict[str, Any] | None = None,
    blocks_per_volume: int | None = None,
) -> dict[str, Any]:
    """Train the IPN on volume blocks, keep the best epoch by validation score.

    Writes ``history_path`` (the U-Net trainer's columns), ``metrics_path``, a
    checkpoint every epoch (removed at the end) and the best model, whose config is
    ``model.network_config()`` plus the prepared volumes' ``depth``.
    ``blocks_per_volume`` is the number of blocks drawn per training volume and epoch
    (``None``: cover its en-face area once on average).  Returns the training metrics.
    """
    from vesselseg.losses import build_loss
    from vesselseg.models import build_model, count_parameters

    t0 = time.monotonic()
    if model.name != "ipn":
        raise ParamsError(f"model.name: fit_ipn trains 'ipn', got {model.name!r}")
    if model.in_channels != 1:
        raise ParamsError(f"model.in_channels={model.in_channels}: the ipn model reads one-channel volumes (set 1)")
    dataset = PreparedDataset(prepared_dir)
    _check_volumes(prepared_dir, dataset)
    tr_items = load_volume_items(dataset, "train")
    va_items = load_volume_items(dataset, "val")
    depths = {it.volume.shape[0] for it in tr_items + va_items}
    if len(depths) != 1:
        raise DataError(f"{prepared_dir}/{VOLUMES_DIR}: volumes have different depths {sorted(depths)}; prepare again")
    depth = depths.pop()
    if train.val_window:
        small = min(tr_items + va_items, key=lambda it: min(it.label.shape))
        if train.val_window > min(small.label.shape):
            raise ParamsError(f"train.val_window={train.val_window} is larger than volume {small.id!r} "
                              f"({small.label.shape[0]}x{small.label.shape[1]} en-face)")
    model_config = {**model.network_config(), "depth": depth}

    device, threads, world = setup_runtime(train, seed)
    batches = VolumeBlocks(
        tr_items, block=model.ipn.block, batch_size=train.batch_size, flip=train.flip, rotate90=train.rotate90,
        seed=seed, blocks_per_volume=blocks_per_volume, rank=world.rank, world=world.size,
    )
    net = build_model(model_config)
    n_params = count_parameters(net)
    # train.channels_last is a no-op here: a 3D net has no channels_last (to_channels_last).
    trainer = IpnTrainer(
        model=net, model_config=model_config, loss_fn=build_loss(train.loss, dice_weight=train.dice_weight),
        params=train, seed=seed, device=device, world=world,
        steps_per_epoch=len(batches),
    )
    fp = ckpt.fingerprint({"model": model_config, "train": train.model_dump(exclude={"threads", "device"}),
                           "seed": seed, "train_ids": [it.id for it in tr_items], "val_ids": [it.id for it in va_items],
                           "blocks_per_volume": blocks_per_volume, "world": world.size})
    state = ckpt.load_checkpoint(checkpoint_path, fp)
    if state is not None:
        trainer.restore(state)
        log.info("resuming from %s at epoch %d", checkpoint_path, trainer.start_epoch)
    log.info(
        "training ipn (%d params, depth %d) on %s, %d threads, %d processes, %d train / %d val volumes, "
        "%d blocks of %d px per epoch, %d steps per epoch",
        n_params, depth, device, threads, world.size, len(tr_items), len(va_items), batches.n_blocks,
        model.ipn.block, len(batches),
    )

    def validate(epoch: int) -> dict[str, float]:
        trainer.refresh_batch_norm(batches, epoch)
        return trainer.validate(va_items)

    return run_epochs(
        trainer, batches, validate, params=train, fingerprint=fp, t0=t0, model_config=model_config,
        n_params=n_params, model_path=model_path, checkpoint_path=checkpoint_path, history_path=history_path,
        metrics_path=metrics_path, logger=logger, model_extra=model_extra,
    )
