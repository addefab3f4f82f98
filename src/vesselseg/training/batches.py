"""Training batches from memory-mapped patch arrays.

Written instead of ``DataLoader`` + ``DistributedSampler`` because the order must be
a pure function of ``(seed, epoch)`` shared by one process and by N DDP ranks: rank r
takes ``perm[r::N]`` of the same permutation, so N ranks with batch B/N see exactly
the samples one process sees with batch B (the DDP equivalence test relies on it),
and a resumed run sees the same order as an uninterrupted one.  A background thread
prepares the next batch (numpy and OpenCV release the GIL) while the model trains.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import albumentations as A
import numpy as np
import torch

from vesselseg.augment import online_augmenter  # first: it turns albumentations' update check off
from vesselseg.normalize import batch_to_input

# Transforms that only move pixels (no interpolation, no value change): image, label and
# FOV can go through them as channels of one array.
_DIHEDRAL = (A.HorizontalFlip, A.VerticalFlip, A.RandomRotate90, A.Transpose)


def _is_dihedral(aug: A.Compose) -> bool:
    return all(isinstance(t, _DIHEDRAL) for t in aug.transforms)


def augment_batch(
    aug: A.Compose, im: np.ndarray, lb: np.ndarray, fv: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Apply ``aug`` to each sample of a batch; image, label and FOV see the same transform.

    Why stacked: each albumentations call has a fixed cost per target, and most of a
    48-px patch's cost is that overhead.  For pixel-moving transforms only (flips,
    rot90: what the online augmenter uses) the label and FOV ride along as extra
    channels of the image in one call: half the time (measured 12.9 vs 23.9 ms per
    batch of 32), and the same random draws, so exactly the same output as calling
    ``aug(image=, mask=, fov=)`` per sample (checked by benchmarks/bench_input_pipeline.py).
    Any other transform (interpolating, value-changing) takes the per-target path.
    """
    if _is_dihedral(aug) and im.dtype == lb.dtype == fv.dtype:
        chans = im if im.ndim == 4 else im[..., None]
        stacked = np.concatenate([chans, lb[..., None], fv[..., None]], axis=-1)
        out = np.stack([aug(image=s)["image"] for s in stacked])
        c = chans.shape[-1]
        im_out = out[..., :c] if im.ndim == 4 else out[..., 0]
        return np.ascontiguousarray(im_out), np.ascontiguousarray(out[..., c]), np.ascontiguousarray(out[..., c + 1])
    res = [aug(image=a, mask=b, fov=c) for a, b, c in zip(im, lb, fv, strict=True)]
    return np.stack([o["image"] for o in res]), np.stack([o["mask"] for o in res]), np.stack([o["fov"] for o in res])


def epoch_order(n: int, *, seed: int, epoch: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """This rank's sample indices for one epoch (the last partial global batch is kept)."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    perm = torch.randperm(n, generator=g).numpy()
    return perm[rank::world]


class PatchBatches:
    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        fov: np.ndarray,
        *,
        batch_size: int,
        flip: bool,
        rotate90: bool,
        seed: int,
        rank: int = 0,
        world: int = 1,
        pin_memory: bool = False,
        prefetch: bool = True,
    ) -> None:
        if batch_size % world:
            raise ValueError(f"train.batch_size={batch_size} must be divisible by the number of processes ({world})")
        self.images, self.labels, self.fov = images, labels, fov
        self.local_batch = batch_size // world
        self.seed, self.rank, self.world = seed, rank, world
        self.flip, self.rotate90 = flip, rotate90
        self.pin_memory = pin_memory
        self.prefetch = prefetch

    def __len__(self) -> int:
        per_rank = -(-len(self.images) // self.world)
        return -(-per_rank // self.local_batch)

    def _make(self, idx: np.ndarray, aug) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = np.sort(idx)  # sorted reads from the memmap; order inside a batch is irrelevant
        im, lb, fv = self.images[idx], self.labels[idx], self.fov[idx]
        if aug is not None:
            im, lb, fv = augment_batch(aug, im, lb, fv)
        x = torch.from_numpy(batch_to_input(im))
        y = torch.from_numpy(np.ascontiguousarray(lb, dtype=np.float32))[:, None]
        m = torch.from_numpy(np.ascontiguousarray(fv, dtype=np.float32))[:, None]
        if self.pin_memory:
            x, y, m = x.pin_memory(), y.pin_memory(), m.pin_memory()
        return x, y, m

    def _batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = epoch_order(len(self.images), seed=self.seed, epoch=epoch, rank=self.rank, world=self.world)
        aug = online_augmenter(
            flip=self.flip, rotate90=self.rotate90, seed=(self.seed * 7919 + epoch) * 131 + self.rank
        )
        for start in range(0, len(order), self.local_batch):
            yield self._make(order[start : start + self.local_batch], aug)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if not self.prefetch:
            yield from self._batches(epoch)
            return
        q: queue.Queue = queue.Queue(maxsize=3)
        done = object()
        stop = threading.Event()

        def work() -> None:
            try:
                for b in self._batches(epoch):
                    if stop.is_set():
                        return
                    q.put(b)
            except BaseException as err:  # surface loader errors in the training thread
                q.put(err)
            q.put(done)

        t = threading.Thread(target=work, daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while t.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    t.join(0.01)
