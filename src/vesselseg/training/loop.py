"""The one trainer and the one epoch loop every neural family shares.

:class:`Trainer` holds what a training run changes (weights, optimizer, scheduler,
grad scaler, history, best epoch) and the train step; :func:`run_epochs` is the loop:
for each epoch ``train_epoch`` -> scheduler -> the family's ``validate`` -> best
weights, history, checkpoint, early stopping; at the end the best weights are saved.
What differs between families (batches, validation, network) comes from the family's
hooks (:class:`vesselseg.families.base.NetworkFamily`).  Every hyperparameter arrives
from ``params.yaml``; nothing is a literal here.

Determinism: the data order, augmentation and dropout of epoch ``e`` are seeded from
``(seed, e)``, so a run resumed from the checkpoint of epoch ``e - 1`` continues
exactly as an uninterrupted run would (tested on the CPU).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn

from vesselseg import atomic
from vesselseg.device import amp_dtype, resolve_device, set_threads, to_channels_last
from vesselseg.errors import DataError
from vesselseg.params import TrainParams
from vesselseg.training import checkpoint as ckpt
from vesselseg.training.distributed import World, barrier, broadcast_flag, init_world

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_dice", "val_iou", "lr", "seconds"]


class EpochLogger(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...


def setup_runtime(params: TrainParams, seed: int) -> tuple[torch.device, int, World]:
    """Device, threads, process group and seeds: the first step of every trainer."""
    device = resolve_device(params.device)
    threads = set_threads(params.threads)
    world = init_world(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.backends.cudnn.benchmark = True  # fixed patch shapes: autotuning pays off
    seed_everything(seed)
    return device, threads, world


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class TrainResult:
    best_epoch: int
    best_score: float
    epochs_run: int
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False

    def metrics(self, n_params: int, seconds: float, select_metric: str) -> dict[str, Any]:
        best = next((h for h in self.history if h["epoch"] == self.best_epoch), {})
        return {
            "best_epoch": self.best_epoch,
            f"best_val_{select_metric}": round(self.best_score, 6),
            "best_val_dice": round(float(best.get("val_dice", float("nan"))), 6),
            "epochs_run": self.epochs_run,
            "n_params": n_params,
            "train_seconds": round(seconds, 1),
        }


def center_crop_to(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Crop labels/masks to the output of an unpadded ("valid") U-Net, which is
    smaller than its input by the same margin on every side."""
    dh, dw = t.shape[-2] - like.shape[-2], t.shape[-1] - like.shape[-1]
    if dh == dw == 0:
        return t
    if dh < 0 or dw < 0:
        raise ValueError(f"network output {tuple(like.shape[-2:])} is larger than its target {tuple(t.shape[-2:])}")
    return t[..., dh // 2 : dh // 2 + like.shape[-2], dw // 2 : dw // 2 + like.shape[-1]]


class Trainer:
    def __init__(
        self,
        *,
        model: nn.Module,
        model_config: dict[str, Any],
        loss_fn: Any,
        params: TrainParams,
        seed: int,
        device: torch.device,
        world: World,
        steps_per_epoch: int,
    ) -> None:
        self.params, self.seed, self.device, self.world = params, seed, device, world
        self.model_config = model_config
        # train.loss 'ce' <-> model.out_channels 2 is a schema rule (vesselseg.params)
        self.two_class = int(model_config.get("out_channels", 1)) == 2
        self.raw_model = model.to(device)
        # On the CPU too: NHWC convs are faster there for these nets (see to_channels_last).
        self.channels_last = params.channels_last and to_channels_last(self.raw_model)
        self.model: nn.Module = self.raw_model
        if world.distributed:
            ids = [device.index] if device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.raw_model, device_ids=ids)
        self.loss_fn = loss_fn
        if params.optimizer == "adam":
            self.optimizer: torch.optim.Optimizer = torch.optim.Adam(
                self.model.parameters(), lr=params.lr, weight_decay=params.weight_decay
            )
        else:
            self.optimizer = torch.optim.SGD(
                self.model.parameters(), lr=params.lr, momentum=params.momentum, weight_decay=params.weight_decay
            )
        self.batch_scheduler = params.scheduler == "onecycle"
        self.scheduler: Any = None
        if params.scheduler == "step":
            self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, params.step_size, params.gamma)
        elif params.scheduler == "onecycle":
            self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
                self.optimizer, max_lr=params.lr, total_steps=max(1, params.epochs * steps_per_epoch)
            )
        # EMA of the weights (train.ema): torch's AveragedModel keeps the shadow copy and its
        # step count.  Only the weights are averaged: averaged BatchNorm statistics do not
        # fit averaged weights (measured on OCTA-500 3M mid-cycle: validation Dice 0.23
        # with them, 0.91 with statistics re-estimated), so selection_weights re-estimates them.
        self.ema: AveragedModel | None = None
        if params.ema > 0:
            self.ema = AveragedModel(self.raw_model, multi_avg_fn=get_ema_multi_avg_fn(params.ema))
        self.amp = amp_dtype(device) if params.amp else None
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == torch.float16 else None
        self.history: list[dict[str, float]] = []
        self.best_score = -math.inf
        self.best_epoch = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.start_epoch = 1

    # -- steps --------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp)

    def _to_device(self, *ts: torch.Tensor) -> list[torch.Tensor]:
        nb = self.device.type == "cuda"
        out = [t.to(self.device, non_blocking=nb) for t in ts]
        if self.channels_last:
            out[0] = out[0].contiguous(memory_format=torch.channels_last)
        return out

    def _loss(self, logits: torch.Tensor | tuple[torch.Tensor, ...], y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        if isinstance(logits, tuple):
            # A stacked U-Net (W-Net) in training: every stage is supervised, as in
            # Galdran et al.; the mean keeps the loss on the scale of one stage's, so
            # history.csv stays comparable across `model.stacks`.
            return torch.stack([self._loss(stage, y, m) for stage in logits]).mean()
        logits = logits.float()
        y, m = center_crop_to(y, logits), center_crop_to(m, logits)
        if self.two_class:
            return self.loss_fn(logits, y[:, 0].long(), mask=m[:, 0])
        return self.loss_fn(logits, y, mask=m)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> dict[str, float]:
        x, y, m = self._to_device(x, y, m)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            logits = self.model(x)
        loss = self._loss(logits, y, m)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update_parameters(self.raw_model)
        if self.batch_scheduler:
            self.scheduler.step()
        return {"loss": float(loss.detach()), "n": int(x.shape[0])}

    def train_epoch(self, batches: Any, epoch: int, deadline: float = math.inf) -> float:
        """Mean training loss of one epoch; cut short once ``deadline`` (monotonic) passes.

        All ranks check the same clock only under a cap (``train.max_minutes``); a
        run without one never depends on time, so it stays deterministic.
        """
        self.model.train()
        # dropout draws from the global torch RNG: seed it per epoch for exact resume
        torch.manual_seed(self.seed * 1000003 + epoch * 1009 + self.world.rank)
        total, count = 0.0, 0
        for x, y, m in batches.epoch(epoch):
            out = self.train_step(x, y, m)
            total += out["loss"] * out["n"]
            count += int(out["n"])
            if time.monotonic() > deadline and not self.world.distributed:
                log.warning("train.max_minutes reached in epoch %d after %d samples", epoch, count)
                break
        stats = torch.tensor([total, float(count)], dtype=torch.float64)
        if self.world.distributed:
            torch.distributed.all_reduce(stats)
        return float(stats[0]) / max(float(stats[1]), 1.0)

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @contextlib.contextmanager
    def selection_weights(self, batches: Any, epoch: int) -> Iterator[None]:
        """The weights an epoch is judged and kept by: the EMA ones under ``train.ema``.

        They are swapped into the raw model for the duration (and the live weights put
        back after), so every family's ``validate`` hook and the best-weights copy work
        unchanged and the saved model file is an ordinary one.  BatchNorm statistics of
        the averaged weights are re-estimated on ``train.ema_bn_batches`` of this epoch's
        training batches (torch's ``update_bn``, as SWA does).
        """
        if self.ema is None:
            yield
            return
        live = {k: v.detach().clone() for k, v in self.raw_model.state_dict().items()}
        self.raw_model.load_state_dict(self.ema.module.state_dict())
        try:
            if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.raw_model.modules()):
                stream = batches.epoch(epoch)
                try:
                    inputs = (self._to_device(x)[0] for x, *_ in itertools.islice(stream, self.params.ema_bn_batches))
                    update_bn(inputs, self.raw_model)
                finally:
                    stream.close()
            yield
        finally:
            self.raw_model.load_state_dict(live)

    # -- state ----------------------------------------------------------------------
    def state(self, epoch: int, fingerprint: str) -> dict[str, Any]:
        return {
            "fingerprint": fingerprint,
            "epoch": epoch,
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "history": self.history,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "best_state": self.best_state,
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.history = list(state["history"])
        self.best_score = float(state["best_score"])
        self.best_epoch = int(state["best_epoch"])
        self.best_state = state.get("best_state")
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.start_epoch = int(state["epoch"]) + 1
        ckpt.set_rng_state(state["rng"])


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    df = pd.DataFrame(history, columns=HISTORY_COLUMNS)
    atomic.write_text(path, df.to_csv(index=False, float_format="%.6g"))


def run_epochs(
    trainer: Trainer,
    batches: Any,
    validate: Callable[[int], dict[str, float]],
    *,
    params: TrainParams,
    fingerprint: str,
    t0: float,
    model_config: dict[str, Any],
    n_params: int,
    model_path: Path,
    checkpoint_path: Path,
    history_path: Path,
    metrics_path: Path,
    logger: EpochLogger | None = None,
    model_extra: dict[str, Any] | None = None,
    extra_metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The epoch loop every trainer shares (U-Net, IPN, patch classifier).

    ``batches`` has ``epoch(e)`` and ``__len__``; ``validate(epoch)`` returns
    ``{"loss", "dice", "iou"}`` on rank 0.  Each epoch: train, step the scheduler,
    validate, keep the best weights, write the history, checkpoint, log, then decide
    (rank 0, broadcast) on early stopping or the time cap.  At the end the best
    weights are saved as the model and the checkpoint is removed.
    """
    world = trainer.world
    deadline = t0 + params.max_minutes * 60 if params.max_minutes else math.inf
    stopped_early = False
    epoch = trainer.start_epoch - 1
    for epoch in range(trainer.start_epoch, params.epochs + 1):
        e0 = time.monotonic()
        lr = trainer.current_lr()
        train_loss = trainer.train_epoch(batches, epoch, deadline)
        if trainer.scheduler is not None and not trainer.batch_scheduler:
            trainer.scheduler.step()
        stop = False
        if world.is_main:
            with trainer.selection_weights(batches, epoch):
                val = validate(epoch)
                score = val[params.select_metric]
                if score > trainer.best_score:
                    trainer.best_score, trainer.best_epoch = score, epoch
                    trainer.best_state = {
                        k: v.detach().to("cpu", copy=True) for k, v in trainer.raw_model.state_dict().items()
                    }
            row = {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": val["loss"],
                "val_dice": val["dice"],
                "val_iou": val["iou"],
                "lr": lr,
                "seconds": round(time.monotonic() - e0, 2),
            }
            trainer.history.append(row)
            write_history(history_path, trainer.history)
            ckpt.save_checkpoint(checkpoint_path, trainer.state(epoch, fingerprint))
            if logger is not None:
                logger.log_metrics({k: float(v) for k, v in row.items() if k != "epoch"}, step=epoch)
            log.info(
                "epoch %d/%d  train_loss %.4f  val_loss %.4f  val_dice %.4f  (best %.4f @ %d)  %.1fs",
                epoch,
                params.epochs,
                train_loss,
                val["loss"],
                val["dice"],
                trainer.best_score,
                trainer.best_epoch,
                row["seconds"],
            )
            if epoch - trainer.best_epoch >= params.patience:
                log.info("early stopping: no better validation %s for %d epochs", params.select_metric, params.patience)
                stop = stopped_early = True
            elif time.monotonic() > deadline:
                log.warning("train.max_minutes=%s reached: stopping after epoch %d", params.max_minutes, epoch)
                stop = True
        if broadcast_flag(stop, world):
            break
    barrier(world)
    result = TrainResult(trainer.best_epoch, trainer.best_score, epoch, trainer.history, stopped_early)
    metrics = {**result.metrics(n_params, time.monotonic() - t0, params.select_metric), **(extra_metrics or {})}
    if world.is_main:
        from vesselseg.models import save_model

        if trainer.best_state is None:
            raise DataError(f"{checkpoint_path}: no epoch produced a model (train.epochs={params.epochs})")
        trainer.raw_model.load_state_dict(trainer.best_state)
        save_model(
            model_path,
            trainer.raw_model,
            model_config,
            extra={**(model_extra or {}), "epoch": trainer.best_epoch, "val_score": round(trainer.best_score, 6)},
        )
        atomic.write_json(metrics_path, metrics)
        Path(checkpoint_path).unlink(missing_ok=True)  # finished: a rerun starts afresh
    return metrics
