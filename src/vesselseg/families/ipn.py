"""The IPN family: the Image Projection Network, trained on volume blocks, predicted on volumes.

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

Everything else is the shared trainer's (:mod:`vesselseg.training.loop`): the
optimizer, schedulers, AMP, DDP wrapping, train step, checkpoint state and resume.
This module adds the block source and validation on whole volumes with the same
sliding-window stitching as prediction, after recomputing the BatchNorm statistics
on the epoch's blocks (see :func:`refresh_batch_norm`: with few steps per epoch the
running averages trail the weights and eval-mode predictions collapse).

Prediction maps a volume ``(depth, H, W)`` to an en-face map ``(H, W)``.  To reuse
the 2D stitching core unchanged (:func:`vesselseg.inference.sliding_window.
sliding_window_inference`), a volume is handed over as an ``(1, depth, H, W)`` tensor
(depth as channels): windows are cut over the en-face plane only, and the predictor
reshapes each window batch ``(B, depth, h, w)`` to the network's ``(B, 1, depth, h, w)``
and returns ``(B, 1, h, w)`` probabilities.  Window placement, Gaussian blending and
the "no padding" rule are therefore exactly those of the 2D models.  Memory at
prediction: one volume as float32 plus, per window batch, the network's activations
of ``batch_size`` windows.

Determinism: the blocks (which volume, where, which flip/rotation) of epoch ``e``
are a pure function of ``(seed, e)``, and rank ``r`` of ``N`` takes ``blocks[r::N]``,
as :class:`~vesselseg.training.batches.PatchBatches` does for patches; dropout and
BN see the per-epoch torch seed of ``Trainer.train_epoch``.  A run resumed from the
checkpoint of epoch ``e - 1`` therefore continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vesselseg.device import amp_dtype
from vesselseg.errors import DataError, ParamsError
from vesselseg.families.base import NetworkFamily, Predictor, TrainingData, TrainJob, pooled_scores, require_val_split
from vesselseg.inference.predict import foreground_probability
from vesselseg.inference.sliding_window import Weighting, fit_window, sliding_window_inference
from vesselseg.inference.tta import predict_with_tta
from vesselseg.params import ModelParams, PredictParams
from vesselseg.prepared import PreparedDataset

log = logging.getLogger(__name__)

__all__ = [
    "FAMILY",
    "IpnFamily",
    "VolumeBlocks",
    "VolumeItem",
    "depth_as_channels",
    "load_prepared_volume",
    "load_volume_items",
    "predict_volume",
    "volume_path",
    "volume_to_input",
]

VOLUMES_DIR = "volumes"
# logit clamp for the validation loss computed from stitched probabilities
_PROB_EPS = 1e-6


def volume_path(prepared_dir: Path | str, id_: str) -> Path:
    """Where the prepare stage keeps a subject's volume (``prepare.volumes: true``)."""
    return Path(prepared_dir) / VOLUMES_DIR / f"{id_}.npy"


def load_prepared_volume(path: Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Memory-map a prepared volume, uint8 (depth, H, W), checked against the en-face ``shape``.

    Memory-mapped so a trainer that cuts small blocks only pages in those blocks.
    """
    if not path.is_file():
        raise DataError(f"{path}: prepared volume not found; run the prepare stage with prepare.volumes: true")
    try:
        vol = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as err:
        raise DataError(f"{path}: not a readable .npy volume ({err})") from None
    if vol.ndim != 3 or vol.dtype != np.uint8:
        raise DataError(f"{path}: expected a uint8 (depth, H, W) volume, got {vol.dtype} {vol.shape}")
    if shape is not None and tuple(vol.shape[1:]) != tuple(shape):
        raise DataError(
            f"{path}: volume en-face size {vol.shape[1]}x{vol.shape[2]} does not match its prepared image "
            f"{shape[0]}x{shape[1]}; run the prepare stage again"
        )
    return vol


def volume_to_input(volume: np.ndarray) -> np.ndarray:
    """uint8 (depth, H, W) -> float32 (depth, H, W) in [0, 1].

    Goes through :func:`vesselseg.normalize.image_to_input` with depth as the channel
    axis, so volumes and 2D images share the one input scaling.
    """
    from vesselseg.normalize import image_to_input

    return image_to_input(np.moveaxis(np.asarray(volume), 0, -1))


def depth_as_channels(net: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Adapt a (B, 1, D, h, w) -> (B, C, h, w) network to the 2D stitching's (B, D, h, w) windows."""

    def predict(x: torch.Tensor) -> torch.Tensor:
        return net(x.unsqueeze(1))

    return predict


def _probability_predictor(
    model: torch.nn.Module, device: torch.device, amp: bool
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Windows in, float32 foreground probabilities (B, 1, h, w) out (probabilities are blended)."""
    dtype = amp_dtype(device, amp)

    def net(x: torch.Tensor) -> torch.Tensor:
        ctx = torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with ctx:
            logits = model(x)
        return foreground_probability(logits)

    return depth_as_channels(net)


def predict_volume(
    model: torch.nn.Module,
    volume: np.ndarray,
    *,
    window: int | tuple[int, int],
    overlap: float,
    weighting: Weighting,
    batch_size: int,
    device: torch.device | str,
    amp: bool,
) -> np.ndarray:
    """Foreground probabilities float32 (H, W) in [0, 1] for one uint8 (depth, H, W) volume.

    The model must already be on ``device``; it is run in eval mode and its previous
    mode restored.  A window at least the en-face size is one forward pass (a longer
    side spans the volume whole, see :func:`~vesselseg.inference.sliding_window.fit_window`).
    """
    if not isinstance(volume, np.ndarray) or volume.dtype != np.uint8 or volume.ndim != 3:
        desc = f"{volume.dtype} {volume.shape}" if isinstance(volume, np.ndarray) else type(volume).__name__
        raise ValueError(f"volume must be uint8 (depth, H, W), got {desc}")
    dev = torch.device(device)
    x = torch.from_numpy(volume_to_input(volume))[None]
    was_training = model.training
    model.eval()
    try:
        probs = sliding_window_inference(
            x,
            window=fit_window(window, x.shape[2], x.shape[3]),
            overlap=overlap,
            predictor=_probability_predictor(model, dev, amp),
            weighting=weighting,
            batch_size=batch_size,
            device=dev,
        )
    finally:
        model.train(was_training)
    out = probs[0, 0].cpu().numpy()
    return np.clip(out, 0.0, 1.0, out=out).astype(np.float32, copy=False)


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


@torch.no_grad()
def refresh_batch_norm(trainer: Any, batches: VolumeBlocks, epoch: int) -> None:
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

    update_bn((x for x, _, _ in batches.epoch(epoch)), trainer.raw_model, device=trainer.device)


class VolumePredictor(Predictor):
    """The IPN over whole prepared volumes (en-face sliding windows at full depth)."""

    unit = "vol"

    def __init__(
        self,
        model: torch.nn.Module,
        config: dict[str, Any],
        predict: PredictParams,
        device: torch.device,
        amp: bool,
        model_path: Path,
    ) -> None:
        from vesselseg.device import amp_dtype

        super().__init__(device=str(device), amp_dtype=str(amp_dtype(device, amp)).replace("torch.", ""))
        self.model, self.predict, self.torch_device, self.amp = model, predict, device, amp
        self.trained_depth = config.get("depth")
        self.model_path = model_path

    def __call__(self, dataset: PreparedDataset, id_: str) -> np.ndarray:
        path = volume_path(dataset.root, id_)
        volume = np.asarray(load_prepared_volume(path))
        if self.trained_depth is not None and volume.shape[0] != int(self.trained_depth):
            raise DataError(
                f"{path}: volume depth {volume.shape[0]} but the model was trained on depth "
                f"{self.trained_depth}; prepare.volume_depth changed since training (train again)"
            )
        p = self.predict

        def one(enface_first: np.ndarray) -> np.ndarray:
            vol = np.ascontiguousarray(np.moveaxis(enface_first, -1, 0))
            # predict.window null (whole images for 2D nets) is the whole en-face plane here too
            window = p.window if p.window is not None else tuple(vol.shape[1:])
            return predict_volume(
                self.model,
                vol,
                window=window,
                overlap=p.overlap,
                weighting=p.weighting,
                batch_size=p.batch_size,
                device=self.torch_device,
                amp=self.amp,
            )

        # TTA flips and rotates the en-face plane: hand the volume over as (H, W, depth)
        return predict_with_tta(one, np.moveaxis(volume, 0, -1), p.tta)


class IpnFamily(NetworkFamily):
    """``blocks_per_volume``: blocks drawn per training volume and epoch (None: cover its en-face area once)."""

    name = "ipn"

    def __init__(self, blocks_per_volume: int | None = None) -> None:
        self.blocks_per_volume = blocks_per_volume

    def network_config(self, model: ModelParams) -> dict[str, Any]:
        # the input depth is the prepared volumes' (prepare.volume_depth): load_data adds
        # it from the data rather than keeping a second setting
        return {
            "name": self.name,
            "in_channels": model.in_channels,
            "out_channels": model.out_channels,
            "channels": model.ipn.channels,
            "n_blocks": model.ipn.n_blocks,
        }

    def load_data(self, job: TrainJob, *, rank: int, world: int, pin_memory: bool) -> TrainingData:
        p = job.params
        dataset = PreparedDataset(job.prepared_dir)
        if not (Path(job.prepared_dir) / VOLUMES_DIR).is_dir():
            raise ParamsError(
                f"{Path(job.prepared_dir) / VOLUMES_DIR}: no prepared volumes; model.name 'ipn' needs "
                "prepare.volumes: true and a volume dataset (run the prepare stage again)"
            )
        require_val_split(dataset)
        tr_items = load_volume_items(dataset, "train")
        va_items = load_volume_items(dataset, "val")
        depths = {it.volume.shape[0] for it in tr_items + va_items}
        if len(depths) != 1:
            raise DataError(
                f"{job.prepared_dir}/{VOLUMES_DIR}: volumes have different depths {sorted(depths)}; prepare again"
            )
        depth = depths.pop()
        if p.train.val_window:
            small = min(tr_items + va_items, key=lambda it: min(it.label.shape))
            if p.train.val_window > min(small.label.shape):
                raise ParamsError(
                    f"train.val_window={p.train.val_window} is larger than volume {small.id!r} "
                    f"({small.label.shape[0]}x{small.label.shape[1]} en-face)"
                )
        # train.channels_last is a no-op here: a 3D net has no channels_last (to_channels_last).
        batches = VolumeBlocks(
            tr_items,
            block=p.model.ipn.block,
            batch_size=p.train.batch_size,
            flip=p.train.flip,
            rotate90=p.train.rotate90,
            seed=p.seed,
            blocks_per_volume=self.blocks_per_volume,
            rank=rank,
            world=world,
        )
        return TrainingData(
            batches=batches,
            fingerprint={
                "train_ids": [it.id for it in tr_items],
                "val_ids": [it.id for it in va_items],
                "blocks_per_volume": self.blocks_per_volume,
            },
            description=(
                f"depth {depth}, {len(tr_items)} train / {len(va_items)} val volumes, "
                f"{batches.n_blocks} blocks of {p.model.ipn.block} px per epoch"
            ),
            state={"val_items": va_items},
            config={"depth": depth},
        )

    def validate(self, trainer: Any, data: TrainingData, epoch: int) -> dict[str, float]:
        """Validation loss and FOV-pooled Dice/IoU of the stitched validation maps.

        The loss is the training loss applied to the stitched probabilities turned
        back into logits (``logit(p)``, or ``[0, logit(p)]`` for two classes, whose
        softmax is ``p``), averaged over volumes: the loss of what predict writes.
        """
        refresh_batch_norm(trainer, data.batches, epoch)
        t = trainer.params
        losses: list[float] = []

        def maps() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
            for it in data.state["val_items"]:
                h, w = it.label.shape
                probs = predict_volume(
                    trainer.raw_model,
                    np.asarray(it.volume),
                    window=t.val_window or (h, w),
                    overlap=t.val_overlap,
                    weighting=t.val_weighting,
                    batch_size=t.batch_size,
                    device=trainer.device,
                    amp=trainer.amp is not None,
                )
                z = torch.logit(torch.from_numpy(probs).clamp(_PROB_EPS, 1 - _PROB_EPS))[None, None]
                logits = torch.cat([torch.zeros_like(z), z], dim=1) if trainer.two_class else z
                y = torch.from_numpy(it.label.astype(np.float32))[None, None]
                m = torch.from_numpy(it.fov.astype(np.float32))[None, None]
                losses.append(float(trainer._loss(logits, y, m)))
                yield probs, it.label, it.fov

        with torch.inference_mode():
            scores = pooled_scores(maps(), t.val_threshold)
        return {"loss": float(np.mean(losses)), **scores}

    def check_inputs(self, dataset: PreparedDataset, ids: Sequence[str]) -> None:
        """Every volume exists and loads, before the model is loaded."""
        if ids and not (dataset.root / VOLUMES_DIR).is_dir():
            raise ParamsError(
                f"{dataset.root / VOLUMES_DIR}: no prepared volumes; the ipn model needs prepare.volumes: true "
                "(run the prepare stage again)"
            )
        for id_ in ids:
            load_prepared_volume(volume_path(dataset.root, id_))

    def load_predictor(self, model_path: Path, *, predict: PredictParams, device: str, amp: bool) -> Predictor:
        from vesselseg.device import resolve_device
        from vesselseg.models import load_model

        dev = resolve_device(device)
        model, meta = load_model(model_path, map_location="cpu")
        return VolumePredictor(model.to(dev).eval(), meta.get("config") or {}, predict, dev, amp, Path(model_path))


FAMILY = IpnFamily()
