"""The U-Net family: trained on patches, validated and predicted on whole images.

Training: the patches of ``data/patches`` (:func:`vesselseg.patches.load_patches`) in a
seeded order with online flips (:class:`~vesselseg.training.batches.PatchBatches`).
Validation, every epoch: the training loss on the validation patches, and Dice/IoU
pooled over the FOV pixels of the *full* validation images predicted exactly as the
predict stage does (:func:`vesselseg.inference.predict.predict_image`, with
``train.val_window``/``val_overlap``/``val_weighting``), so the epoch kept is the one
that predicts best, not the one that fits patches best.

Prediction: sliding windows over the whole image (``predict.*``), one forward pass
when the window spans the image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from vesselseg import imagefiles
from vesselseg.families.base import (
    NetworkFamily,
    Predictor,
    TrainingData,
    TrainJob,
    check_image_channels,
    patch_batches,
    pooled_scores,
    require_channels,
    require_val_split,
)
from vesselseg.inference.tta import predict_with_tta
from vesselseg.params import ModelParams, PredictParams
from vesselseg.prepared import PreparedDataset

__all__ = ["FAMILY", "UNetFamily", "WindowPredictor", "val_loss"]


@torch.inference_mode()
def val_loss(trainer: Any, images: np.ndarray, labels: np.ndarray, fov: np.ndarray, batch_size: int) -> float:
    """The training loss on the validation patches (eval mode), averaged per patch."""
    from vesselseg.normalize import batch_to_input

    trainer.raw_model.eval()
    total, count = 0.0, 0
    for s in range(0, len(images), batch_size):
        x = torch.from_numpy(batch_to_input(images[s : s + batch_size]))
        y = torch.from_numpy(np.asarray(labels[s : s + batch_size], dtype=np.float32))[:, None]
        m = torch.from_numpy(np.asarray(fov[s : s + batch_size], dtype=np.float32))[:, None]
        x, y, m = trainer._to_device(x, y, m)
        with trainer._autocast():
            logits = trainer.raw_model(x)
        total += float(trainer._loss(logits, y, m)) * len(x)
        count += len(x)
    return total / max(count, 1)


class WindowPredictor(Predictor):
    """A 2D network over whole images by sliding windows (the U-Net's, and any dense 2D net's)."""

    def __init__(
        self, model: torch.nn.Module, meta: dict[str, Any], predict: PredictParams, device: torch.device, amp: bool
    ) -> None:
        from vesselseg.device import amp_dtype, to_channels_last

        dtype = amp_dtype(device, amp)
        super().__init__(device=str(device), amp_dtype=str(dtype).removeprefix("torch.") if dtype else "float32")
        self.model, self.predict, self.amp, self.torch_device = model, predict, amp, device
        self.in_channels = (meta.get("config") or {}).get("in_channels")
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # one window shape per run: autotuning pays off
        self.channels_last = predict.channels_last and to_channels_last(model)

    def __call__(self, dataset: PreparedDataset, id_: str) -> np.ndarray:
        path = dataset.paths(id_)[0]
        image = imagefiles.read_image(path)
        check_image_channels(path, image, self.in_channels)
        return self.predict_image(image)

    def predict_image(self, image: np.ndarray) -> np.ndarray:
        from vesselseg.inference.predict import predict_image

        p = self.predict

        def one(im: np.ndarray) -> np.ndarray:
            return predict_image(
                self.model,
                im,
                window=p.window,
                overlap=p.overlap,
                weighting=p.weighting,
                batch_size=p.batch_size,
                device=self.torch_device,
                amp=self.amp,
                channels_last=self.channels_last,
            )

        return predict_with_tta(one, image, p.tta)


class UNetFamily(NetworkFamily):
    name = "unet"

    def network_config(self, model: ModelParams) -> dict[str, Any]:
        keys = (
            "depth",
            "base_channels",
            "batch_norm",
            "dropout",
            "upsampling",
            "padding",
            "input_norm",
            "stacks",
            "out_channels",
        )
        return {"name": self.name, "in_channels": model.in_channels, **{k: getattr(model, k) for k in keys}}

    def load_data(self, job: TrainJob, *, rank: int, world: int, pin_memory: bool) -> TrainingData:
        from vesselseg.patches import load_patches

        p = job.params
        tr_images, tr_labels, tr_fov = load_patches(job.patch_dir, "train")
        va = load_patches(job.patch_dir, "val")
        require_channels("prepared images", 1 if tr_images.ndim == 3 else int(tr_images.shape[-1]), p.model)
        dataset = PreparedDataset(job.prepared_dir)
        require_val_split(dataset)
        batches = patch_batches(p, (tr_images, tr_labels, tr_fov), rank=rank, world=world, pin_memory=pin_memory)
        return TrainingData(
            batches=batches,
            fingerprint={"n_train": len(tr_images), "n_val": len(va[0])},
            description=f"{len(tr_images)} train / {len(va[0])} val patches",
            state={"val_patches": va, "dataset": dataset},
        )

    @torch.inference_mode()
    def validate(self, trainer: Any, data: TrainingData, epoch: int) -> dict[str, float]:
        from vesselseg.inference.predict import predict_image

        t = trainer.params
        va_images, va_labels, va_fov = data.state["val_patches"]
        loss = val_loss(trainer, va_images, va_labels, va_fov, t.batch_size)
        trainer.raw_model.eval()

        def maps() -> Any:
            for item in data.state["dataset"].items("val"):
                probs = predict_image(
                    trainer.raw_model,
                    item.image,
                    window=t.val_window,
                    overlap=t.val_overlap,
                    weighting=t.val_weighting,
                    batch_size=t.batch_size,
                    device=trainer.device,
                    amp=trainer.amp is not None,
                    channels_last=trainer.channels_last,
                )
                yield probs, item.label, item.fov

        return {"loss": loss, **pooled_scores(maps(), t.val_threshold)}

    def load_predictor(self, model_path: Path, *, predict: PredictParams, device: str, amp: bool) -> Predictor:
        from vesselseg.device import resolve_device
        from vesselseg.models import load_model

        dev = resolve_device(device)
        model, meta = load_model(model_path, map_location="cpu")
        return WindowPredictor(model.to(dev).eval(), meta, predict, dev, amp)


FAMILY = UNetFamily()
