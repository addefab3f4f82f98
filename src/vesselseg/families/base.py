"""What every model family implements, and the shared machinery they plug into.

A family is one object with two entry points, called by the ``train`` and ``predict``
stages through the registry (:func:`vesselseg.families.get_family`):

* :meth:`Family.fit` trains on a prepared dataset and writes the model file, the
  training history and the training metrics;
* :meth:`Family.load_predictor` rebuilds the model from its file and returns a
  :class:`Predictor`, a callable from one prepared item to its probability map.
  The one prediction writer (:func:`vesselseg.inference.predict.run_predict`) owns
  the files, the atomic swap, the progress bar and the timing stats for every family.

Neural families subclass :class:`NetworkFamily`, whose :meth:`~NetworkFamily.fit` is
a template (nnU-Net's trainer shape): set up the runtime, :meth:`~NetworkFamily.load_data`
(the family's batches and validation data), :meth:`~NetworkFamily.network_config`,
build, :meth:`~NetworkFamily.init_weights`, resume from the checkpoint, then the one
epoch loop :func:`vesselseg.training.loop.run_epochs` calling the family's
:meth:`~NetworkFamily.validate` each epoch.  A family overrides only what differs.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from vesselseg.errors import DataError, ParamsError
from vesselseg.prepared import PreparedDataset
from vesselseg.registry import FamilyInfo, info

if TYPE_CHECKING:
    import torch

    from vesselseg.params import ModelParams, Params, PredictParams, TrainParams
    from vesselseg.training.loop import EpochLogger, Trainer

log = logging.getLogger(__name__)

__all__ = ["Family", "NetworkFamily", "Predictor", "TrainJob", "TrainingData", "check_image_channels", "pooled_scores"]


@dataclass(frozen=True)
class TrainJob:
    """Everything the train stage hands a family: the validated params and the file locations."""

    params: Params
    prepared_dir: Path
    model_path: Path
    history_path: Path
    metrics_path: Path
    patch_dir: Path = Path("data/patches")
    checkpoint_path: Path = Path("models/checkpoint.pt")
    logger: EpochLogger | None = None
    # written into the model file's ``extra`` (no run id or time: equal params, equal bytes)
    model_extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainingData:
    """What :meth:`NetworkFamily.load_data` returns: the epoch batches plus the family's own state.

    ``batches`` has ``epoch(e)`` (an iterator of ``(x, y, fov)`` tensors) and ``__len__``;
    ``fingerprint`` holds what, besides the params, makes a checkpoint resumable;
    ``description`` ends the "training ..." log line; ``state`` is for the family's
    :meth:`~NetworkFamily.validate` (validation patches, volumes, ...).
    """

    batches: Any
    fingerprint: dict[str, Any]
    description: str
    state: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # added to the network config (e.g. the IPN's depth)
    model_extra: dict[str, Any] = field(default_factory=dict)
    extra_metrics: dict[str, Any] = field(default_factory=dict)


def pooled_scores(pairs: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], threshold: float) -> dict[str, float]:
    """FOV-pooled Dice and IoU of ``(probs, label, fov)`` pairs: every family's validation score.

    Goes through :class:`vesselseg.metrics.MetricAccumulator`, the same pooling the
    evaluate stage uses, so a validation Dice and a test Dice mean the same thing.
    """
    from vesselseg.metrics import MetricAccumulator, scores_from_confusion

    acc = MetricAccumulator(threshold=threshold)
    for probs, label, fov in pairs:
        acc.update(np.asarray(probs, dtype=np.float32), np.asarray(label, dtype=bool), np.asarray(fov, dtype=bool))
    s = scores_from_confusion(*acc.confusion())
    return {"dice": float(s["dice"]), "iou": float(s["iou"])}


def check_image_channels(path: Path | str, image: np.ndarray, expected: int | None) -> None:
    """One line naming the prepared file when its channels differ from what the model was built for."""
    got = 1 if image.ndim == 2 else int(image.shape[2])
    if expected is not None and got != int(expected):
        raise DataError(f"{path}: image has {got} channel(s) but the model expects {expected} (model.in_channels)")


class Predictor(ABC):
    """A loaded model: one prepared item in, float32 ``(H, W)`` probabilities in [0, 1] out."""

    unit: ClassVar[str] = "img"

    def __init__(self, *, device: str = "cpu", amp_dtype: str = "float32") -> None:
        self.device = device
        self.amp_dtype = amp_dtype
        self.stats: dict[str, Any] = {}  # family-specific facts for the prediction stats (e.g. a grid stride)

    @abstractmethod
    def __call__(self, dataset: PreparedDataset, id_: str) -> np.ndarray: ...

    def predict_image(self, image: np.ndarray) -> np.ndarray:
        """One prepared 2D image (uint8 (H, W) or (H, W, C)) -> probabilities: what ``vesselseg segment`` calls.

        Families whose input is not a single image (volumes) refuse in one line.
        """
        raise DataError(f"a model that predicts from {self.unit}s cannot segment single images")


class Family(ABC):
    """One model family: how it is trained (:meth:`fit`) and predicted (:meth:`load_predictor`)."""

    name: ClassVar[str]

    @property
    def info(self) -> FamilyInfo:
        return info(self.name)

    @abstractmethod
    def fit(self, job: TrainJob) -> dict[str, Any]:
        """Train on ``job.prepared_dir``; write the model, history and metrics files; return the metrics."""

    @abstractmethod
    def load_predictor(self, model_path: Path, *, predict: PredictParams, device: str, amp: bool) -> Predictor:
        """Rebuild the model stored in ``model_path`` for prediction with ``predict``'s settings."""

    def check_inputs(self, dataset: PreparedDataset, ids: Sequence[str]) -> None:
        """Refuse unreadable inputs before the model is loaded or any output is written.

        Default: every prepared image has a readable header (a second for a whole
        dataset: no pixel is decoded).
        """
        from vesselseg.imagefiles import image_size

        for id_ in ids:
            image_size(dataset.paths(id_)[0])


class NetworkFamily(Family):
    """A torch network trained by the shared :class:`~vesselseg.training.loop.Trainer`.

    Hooks, in the order :meth:`fit` calls them: :meth:`load_data`, :meth:`network_config`,
    :meth:`init_weights`, :meth:`loss`, then per epoch :meth:`validate`.  The trainer
    class itself is :attr:`trainer_class`, for a family whose train step differs.
    """

    @property
    def trainer_class(self) -> type[Trainer]:
        from vesselseg.training.loop import Trainer

        return Trainer

    @abstractmethod
    def load_data(self, job: TrainJob, *, rank: int, world: int, pin_memory: bool) -> TrainingData:
        """The training batches and the validation data; refuse data the params cannot train on."""

    @abstractmethod
    def validate(self, trainer: Trainer, data: TrainingData, epoch: int) -> dict[str, float]:
        """``{"loss", "dice", "iou"}`` on the validation data (rank 0 only), model in its final state of ``epoch``."""

    @abstractmethod
    def network_config(self, model: ModelParams) -> dict[str, Any]:
        """The network constructor's keywords from ``model`` (what the model file stores as its config)."""

    def init_weights(self, net: torch.nn.Module, model: ModelParams) -> None:
        """Start from given weights instead of the constructor's initialisation (default: nothing)."""

    def loss(self, train: TrainParams) -> Any:
        from vesselseg.losses import build_loss

        return build_loss(train.loss, dice_weight=train.dice_weight)

    def fit(self, job: TrainJob) -> dict[str, Any]:
        from vesselseg.models import build_model, count_parameters
        from vesselseg.training import checkpoint as ckpt
        from vesselseg.training.loop import run_epochs, setup_runtime

        t0 = time.monotonic()
        p = job.params
        device, threads, world = setup_runtime(p.train, p.seed)
        data = self.load_data(job, rank=world.rank, world=world.size, pin_memory=device.type == "cuda")
        config = {**self.network_config(p.model), **data.config}
        net = build_model(config)
        self.init_weights(net, p.model)
        n_params = count_parameters(net)
        trainer = self.trainer_class(
            model=net,
            model_config=config,
            loss_fn=self.loss(p.train),
            params=p.train,
            seed=p.seed,
            device=device,
            world=world,
            steps_per_epoch=len(data.batches),
        )
        fp = ckpt.fingerprint(
            {
                "model": config,
                "train": p.train.model_dump(exclude={"threads", "device"}),
                "seed": p.seed,
                "world": world.size,
                **data.fingerprint,
            }
        )
        state = ckpt.load_checkpoint(job.checkpoint_path, fp)
        if state is not None:
            trainer.restore(state)
            log.info("resuming from %s at epoch %d", job.checkpoint_path, trainer.start_epoch)
        log.info(
            "training %s (%d params) on %s, %d threads, %d processes: %s, %d steps per epoch",
            self.name,
            n_params,
            device,
            threads,
            world.size,
            data.description,
            len(data.batches),
        )
        return run_epochs(
            trainer,
            data.batches,
            lambda epoch: self.validate(trainer, data, epoch),
            params=p.train,
            fingerprint=fp,
            t0=t0,
            model_config=config,
            n_params=n_params,
            model_path=job.model_path,
            checkpoint_path=job.checkpoint_path,
            history_path=job.history_path,
            metrics_path=job.metrics_path,
            logger=job.logger,
            model_extra={**job.model_extra, **data.model_extra},
            extra_metrics=data.extra_metrics,
        )


def patch_batches(
    params: Params, patches: tuple[np.ndarray, np.ndarray, np.ndarray], *, rank: int, world: int, pin_memory: bool
) -> Any:
    """The seeded, augmented epoch batches of training patches (U-Net and ResNet patch families)."""
    from vesselseg.training.batches import PatchBatches

    t = params.train
    return PatchBatches(
        *patches,
        batch_size=t.batch_size,
        flip=t.flip,
        rotate90=t.rotate90,
        seed=params.seed,
        rank=rank,
        world=world,
        pin_memory=pin_memory,
    )


def require_val_split(dataset: PreparedDataset) -> None:
    if not dataset.ids("val"):
        raise DataError(f"{dataset.root}/split.json: the validation split is empty (raise data.val_fraction)")


def require_channels(what: str, got: int, model: ModelParams) -> None:
    """The training data's channels against ``model.in_channels`` (data-dependent: not a schema rule)."""
    if got != model.in_channels:
        raise ParamsError(
            f"model.in_channels={model.in_channels} but the {what} have {got} channel(s) (prepare.channel rgb gives 3)"
        )
