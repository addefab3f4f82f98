"""What the classical baselines (``knn``, ``vesselness``) share: fitted once, stored as arrays.

They go through the same stages and files as the networks: ``train`` writes
``models/model.pt`` (a ``vesselseg-model/1`` dict whose arrays are tensors, never
pickles, so ``torch.load(weights_only=True)`` reads it), ``reports/train/history.csv``
and ``reports/train/metrics.json``; ``predict`` goes through the one prediction writer.

History of a model fitted in one go: one row, ``epoch`` 1.  ``val_loss`` (pooled FOV
log loss of the validation probabilities), ``val_dice`` and ``val_iou`` (pooled FOV,
at ``train.val_threshold``) are real; ``train_loss`` and ``lr`` do not exist for these
models and are written as 0, never NaN or empty, so DVC plots and CSV readers see
numbers in every row.

A classical family implements :meth:`ClassicalFamily.fit_model` (returns the
:class:`Fitted` model) and :meth:`ClassicalFamily.probability_function` (rebuilds
the per-item probability from the stored arrays).
"""

from __future__ import annotations

import logging
import os
import time
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vesselseg import atomic
from vesselseg.errors import DataError
from vesselseg.families.base import Family, Predictor, TrainJob
from vesselseg.params import Params, PredictParams
from vesselseg.prepared import Item, PreparedDataset

log = logging.getLogger(__name__)

__all__ = ["ClassicalFamily", "Fitted", "grey_items", "query_jobs"]


@dataclass
class Fitted:
    """A fitted classical model: what the file stores, plus its validation probabilities."""

    config: dict[str, Any]
    state: dict[str, torch.Tensor]  # arrays as tensors: the model file stays weights_only-loadable
    info: dict[str, Any]  # into the metrics and the model file's extra
    val_probs: list[np.ndarray]
    val_items: list[Item]


def query_jobs() -> int:
    """Processes for the slow per-pixel queries: ``VESSELSEG_THREADS`` when set, else every core.

    Queries are independent, so scikit-learn splits them across processes; parallel
    DVC queues set ``VESSELSEG_THREADS`` to give each run its share.
    """
    env = os.environ.get("VESSELSEG_THREADS")
    return max(1, int(env)) if env and env.strip().isdigit() else -1


def grey_items(dataset: PreparedDataset, split: str) -> list[Item]:
    """The split's items; the classical baselines read one grey channel (the schema refuses rgb)."""
    items = dataset.items(split)
    for it in items:
        if it.image.ndim != 2:
            raise DataError(
                f"{dataset.paths(it.id)[0]}: the classical baselines need grey images, got {it.image.shape} "
                "(set prepare.channel to green or grey)"
            )
    if not items:
        raise DataError(f"{dataset.root}/split.json: split '{split}' is empty")
    return items


class ClassicalPredictor(Predictor):
    def __init__(self, probability: Callable[[Item], np.ndarray], tta: str = "none") -> None:
        super().__init__(device="cpu")
        self.probability, self.tta = probability, tta

    def __call__(self, dataset: PreparedDataset, id_: str) -> np.ndarray:
        from vesselseg.inference.tta import predict_with_tta

        item = dataset.load(id_)
        if item.image.ndim != 2:
            raise DataError(
                f"{dataset.paths(id_)[0]}: the classical baselines need grey images, got "
                f"{item.image.shape} (set prepare.channel to green or grey)"
            )

        def one(image_and_fov: np.ndarray) -> np.ndarray:
            # image and FOV travel together through TTA's flips as two channels
            fov = image_and_fov[..., 1] > 0
            return self.probability(Item(item.id, np.ascontiguousarray(image_and_fov[..., 0]), fov, fov))

        stacked = np.dstack([item.image, item.fov.astype(np.uint8)])
        return np.clip(predict_with_tta(one, stacked, self.tta), 0.0, 1.0).astype(np.float32)


class ClassicalFamily(Family):
    """Fit once on the prepared images (no patches, no epochs); predict from stored arrays."""

    state_keys: tuple[str, ...] = ()  # what a model file of this family must hold

    @abstractmethod
    def fit_model(self, params: Params, dataset: PreparedDataset) -> Fitted:
        """Fit on the training (and, for choices, validation) items; never look at test."""

    @abstractmethod
    def probability_function(
        self, config: dict[str, Any], state: dict[str, torch.Tensor]
    ) -> Callable[[Item], np.ndarray]:
        """The stored model as ``item -> float32 (H, W) probabilities``."""

    def fit(self, job: TrainJob) -> dict[str, Any]:
        from vesselseg.families.base import pooled_scores
        from vesselseg.metrics import MetricAccumulator
        from vesselseg.models import MODEL_FORMAT
        from vesselseg.training.loop import write_history

        p = job.params
        t0 = time.monotonic()
        fitted = self.fit_model(p, PreparedDataset(job.prepared_dir))
        pairs = [(pr, it.label, it.fov) for pr, it in zip(fitted.val_probs, fitted.val_items, strict=True)]
        scores = pooled_scores(pairs, p.train.val_threshold)
        acc = MetricAccumulator(threshold=p.train.val_threshold)
        for probs, label, fov in pairs:
            acc.update(probs, label, fov)
        val_loss = acc.loss_sum / max(acc.n_pixels, 1)
        seconds = time.monotonic() - t0
        row = {
            "epoch": 1,
            "train_loss": 0.0,
            "val_loss": val_loss,
            "val_dice": scores["dice"],
            "val_iou": scores["iou"],
            "lr": 0.0,
            "seconds": round(seconds, 2),
        }
        obj = {
            "format": MODEL_FORMAT,
            "config": fitted.config,
            "state_dict": fitted.state,
            "extra": {**job.model_extra, "val_dice": round(scores["dice"], 6), **fitted.info},
            "torch_version": torch.__version__.split("+")[0],
        }
        atomic.write_torch(job.model_path, obj)
        write_history(job.history_path, [row])
        metrics = {
            "best_epoch": 1,
            "epochs_run": 1,
            "best_val_dice": round(scores["dice"], 6),
            "best_val_iou": round(scores["iou"], 6),
            "train_seconds": round(seconds, 1),
            **fitted.info,
        }
        atomic.write_json(job.metrics_path, metrics)
        log.info("%s fitted in %.1f s: validation Dice %.4f (%s)", self.name, seconds, scores["dice"], fitted.info)
        return metrics

    def _load(self, model_path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        from vesselseg.models import read_model_file

        obj = read_model_file(model_path)
        name = obj["config"].get("name")
        if name != self.name:
            raise DataError(f"{model_path}: holds a {name!r} model, not a classical baseline of family {self.name!r}")
        missing = [k for k in self.state_keys if k not in obj["state_dict"]]
        if missing:
            raise DataError(f"{model_path}: {self.name} model file lacks {missing}")
        return obj["config"], obj["state_dict"]

    def load_predictor(self, model_path: Path, *, predict: PredictParams, device: str, amp: bool) -> Predictor:
        config, state = self._load(Path(model_path))
        return ClassicalPredictor(self.probability_function(config, state), predict.tta)
