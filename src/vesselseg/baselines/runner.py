"""The classical baselines (``model.name`` knn | vesselness) as train and predict stages.

They go through the same stages and files as the networks: ``train`` writes
``models/model.pt`` (a ``vesselseg-model/1`` dict whose arrays are tensors, never
pickles), ``reports/train/history.csv`` and ``reports/train/metrics.json``;
``predict`` writes the same probability maps and masks as the U-Net predictor.

History of a model fitted in one go: one row, ``epoch`` 1.  ``val_loss`` (pooled
FOV log loss of the validation probabilities), ``val_dice`` and ``val_iou``
(pooled FOV, threshold 0.5 on the probabilities) are real; ``train_loss`` and
``lr`` do not exist for these models and are written as 0, never NaN or empty, so
DVC plots and CSV readers see numbers in every row.

Vesselness probabilities: the Frangi response ``v`` in [0, 1] and the threshold
``t`` chosen on the validation images map to ``p`` by the monotone piecewise-linear
map ``p = 0.5 v / t`` below ``t`` and ``p = 0.5 + 0.5 (v - t) / (1 - t)`` from ``t``
on, so ``p >= 0.5`` exactly when ``v >= t``: ``predict.threshold`` 0.5 means the
validated threshold, and ROC/AUC (rank-based) are those of the raw response.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from vesselseg import atomic, io
from vesselseg.errors import DataError, ParamsError
from vesselseg.layout import Item, PreparedDataset
from vesselseg.params import CLASSICAL_MODELS, ModelParams

log = logging.getLogger(__name__)

__all__ = ["fit_classical", "predict_classical", "vesselness_to_probability"]

MODEL_FORMAT = "vesselseg-model/1"
HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_dice", "val_iou", "lr", "seconds"]
# the operating point of the validation scores in history/metrics (predict uses its own)
VAL_THRESHOLD = 0.5


def vesselness_to_probability(v: np.ndarray, threshold: float) -> np.ndarray:
    """Monotone map of vesselness ``v`` in [0, 1] to float32 ``p`` with ``p >= 0.5`` iff ``v >= threshold``.

    The two branches are clamped on the float32 side of 0.5 so rounding can never
    move a pixel across the decision boundary.
    """
    v = np.clip(np.asarray(v, dtype=np.float64), 0.0, 1.0)
    t = float(threshold)
    above = v >= t
    if t <= 0.0:
        p = 0.5 + 0.5 * v
    elif t >= 1.0:
        p = np.where(above, 1.0, 0.5 * v)
    else:
        p = np.where(above, 0.5 + 0.5 * (v - t) / (1.0 - t), 0.5 * v / t)
    p32 = p.astype(np.float32)
    below_half = np.nextafter(np.float32(0.5), np.float32(0.0))
    return np.where(above, np.maximum(p32, np.float32(0.5)), np.minimum(p32, below_half)).astype(np.float32)


def _query_jobs() -> int:
    """Processes for k-NN queries (the slow part): ``VESSELSEG_THREADS`` when set, else every core.

    Queries are independent, so scikit-learn splits them across processes; parallel
    DVC queues set ``VESSELSEG_THREADS`` to give each run its share.
    """
    env = os.environ.get("VESSELSEG_THREADS")
    return max(1, int(env)) if env and env.strip().isdigit() else -1


def _grey_items(dataset: PreparedDataset, split: str, prepared_dir: Path) -> list[Item]:
    items = dataset.items(split)
    for it in items:
        if it.image.ndim != 2:
            raise DataError(
                f"{dataset.paths(it.id)[0]}: the classical baselines need grey images, got {it.image.shape} "
                "(set prepare.channel to green or grey)"
            )
    if not items:
        raise DataError(f"{prepared_dir}/split.json: split '{split}' is empty")
    return items


def _val_scores(probs: Sequence[np.ndarray], items: Sequence[Item]) -> dict[str, float]:
    """Pooled FOV log loss, Dice and IoU at :data:`VAL_THRESHOLD` over the validation images."""
    from vesselseg.metrics import confusion, log_loss, scores_from_confusion

    tp = fp = fn = tn = 0
    loss_sum, n = 0.0, 0
    for p, it in zip(probs, items, strict=True):
        c = confusion(p >= VAL_THRESHOLD, it.label, it.fov)
        tp, fp, fn, tn = tp + c[0], fp + c[1], fn + c[2], tn + c[3]
        k = int(it.fov.sum())
        loss_sum += log_loss(p, it.label, it.fov) * k
        n += k
    s = scores_from_confusion(tp, fp, fn, tn)
    return {"val_loss": loss_sum / max(n, 1), "val_dice": float(s["dice"]), "val_iou": float(s["iou"])}


def _save(path: Path, config: dict[str, Any], state: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
    obj = {"format": MODEL_FORMAT, "config": config, "state_dict": state, "extra": extra,
           "torch_version": torch.__version__.split("+")[0]}
    atomic.write_torch(path, obj)


def _fit_knn(model: ModelParams, seed: int, dataset: PreparedDataset, prepared_dir: Path) -> tuple[dict, dict, dict, list]:
    from vesselseg.baselines.knn import fit_knn, predict_proba_image, sample_training_pixels

    p = model.knn
    train = _grey_items(dataset, "train", prepared_dir)
    X, y = sample_training_pixels(
        [it.image for it in train], [it.label for it in train], [it.fov for it in train],
        background_keep=p.background_keep, near_vessel_px=p.near_vessel_px, max_pixels=p.max_pixels,
        rng=np.random.default_rng(seed),
    )
    clf, best_k = fit_knn(X, y, k_grid=p.k_grid, cv=p.cv, seed=seed)
    clf.set_params(n_jobs=_query_jobs())
    val = _grey_items(dataset, "val", prepared_dir)
    probs = [predict_proba_image(clf, it.image, it.fov) for it in tqdm(val, desc="k-NN val", unit="img", disable=None)]
    config = {"name": "knn", "k": best_k}
    # the training pixels *are* the model: store them so predict refits the same classifier
    state = {"X": torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)),
             "y": torch.from_numpy(np.ascontiguousarray(y, dtype=np.uint8)),
             "k": torch.tensor(best_k, dtype=torch.int64)}
    info = {"best_k": best_k, "n_train_pixels": int(len(y)), "train_vessel_fraction": round(float(y.mean()), 6)}
    return config, state, info, [probs, val]


def _fit_vesselness(model: ModelParams, dataset: PreparedDataset, prepared_dir: Path) -> tuple[dict, dict, dict, list]:
    from vesselseg.baselines.vesselness import choose_threshold, frangi_vesselness

    p = model.vesselness
    val = _grey_items(dataset, "val", prepared_dir)  # the threshold sees validation images only, never test
    responses = [
        frangi_vesselness(it.image, it.fov, sigmas=p.sigmas, black_ridges=p.black_ridges)
        for it in tqdm(val, desc="vesselness val", unit="img", disable=None)
    ]
    threshold = choose_threshold(responses, [it.label for it in val], [it.fov for it in val])
    probs = [vesselness_to_probability(r, threshold) for r in responses]
    config = {"name": "vesselness", "sigmas": [float(s) for s in p.sigmas], "black_ridges": bool(p.black_ridges)}
    state = {"threshold": torch.tensor(threshold, dtype=torch.float64),
             "sigmas": torch.tensor([float(s) for s in p.sigmas], dtype=torch.float64),
             "black_ridges": torch.tensor(bool(p.black_ridges))}
    info = {"threshold": round(float(threshold), 6), "n_val_images": len(val), "n_params": 1}
    return config, state, info, [probs, val]


def fit_classical(
    *,
    model: ModelParams,
    seed: int,
    prepared_dir: Path,
    model_path: Path,
    history_path: Path,
    metrics_path: Path,
) -> dict[str, Any]:
    """Fit ``model.name`` (knn: k by CV on training pixels; vesselness: threshold on val), save it.

    Returns the metrics written to ``metrics_path``: ``best_epoch`` (1),
    ``epochs_run`` (1), ``best_val_dice``, ``best_val_iou``, ``train_seconds``, and
    ``best_k``/``n_train_pixels`` (knn) or ``threshold``/``n_params`` (vesselness).
    """
    if model.name not in CLASSICAL_MODELS:
        raise ParamsError(f"model.name: {model.name!r} is not a classical baseline (valid: {list(CLASSICAL_MODELS)})")
    t0 = time.monotonic()
    dataset = PreparedDataset(prepared_dir)
    if model.name == "knn":
        config, state, info, (probs, val) = _fit_knn(model, seed, dataset, Path(prepared_dir))
    else:
        config, state, info, (probs, val) = _fit_vesselness(model, dataset, Path(prepared_dir))
    scores = _val_scores(probs, val)
    seconds = time.monotonic() - t0
    row = {"epoch": 1, "train_loss": 0.0, **scores, "lr": 0.0, "seconds": round(seconds, 2)}
    _save(Path(model_path), config, state, {"val_dice": round(scores["val_dice"], 6), **info})
    atomic.write_text(history_path, pd.DataFrame([row], columns=HISTORY_COLUMNS).to_csv(index=False, float_format="%.6g"))
    metrics = {"best_epoch": 1, "epochs_run": 1, "best_val_dice": round(scores["val_dice"], 6),
               "best_val_iou": round(scores["val_iou"], 6), "train_seconds": round(seconds, 1), **info}
    atomic.write_json(metrics_path, metrics)
    log.info("%s fitted in %.1f s: validation Dice %.4f (%s)", model.name, seconds, scores["val_dice"], info)
    return metrics


def _load(model_path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    model_path = Path(model_path)
    if not model_path.is_file():
        raise DataError(f"{model_path}: model file not found; run the train stage first")
    try:
        obj = torch.load(model_path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every load failure means "not our file"
        raise DataError(f"{model_path}: not a vesselseg model file ({type(err).__name__})") from None
    if not isinstance(obj, dict) or obj.get("format") != MODEL_FORMAT or not isinstance(obj.get("config"), dict):
        raise DataError(f"{model_path}: not a vesselseg model file (format {MODEL_FORMAT!r} expected)")
    name = obj["config"].get("name")
    if name not in CLASSICAL_MODELS:
        raise DataError(f"{model_path}: holds a {name!r} model, not a classical baseline ({list(CLASSICAL_MODELS)})")
    needed = ("X", "y", "k") if name == "knn" else ("threshold", "sigmas", "black_ridges")
    missing = [k for k in needed if k not in obj.get("state_dict", {})]
    if missing:
        raise DataError(f"{model_path}: {name} model file lacks {missing}")
    return obj["config"], obj["state_dict"]


def predict_classical(
    *,
    model_path: Path,
    prepared_dir: Path,
    out_dir: Path,
    threshold: float,
    splits: Sequence[str] = ("val", "test"),
) -> dict[str, Any]:
    """Write ``out_dir/<split>/probs/<id>.npy`` (float32 in [0, 1]) and ``masks/<id>.png`` ({0, 255}).

    The whole ``out_dir`` is built under a temporary name and swapped in at the end.
    Returns ``{"n_images", "seconds_total", "splits": {split: n}}``.
    """
    if not 0.0 < float(threshold) < 1.0:
        raise ParamsError(f"predict.threshold must be > 0 and < 1, got {threshold!r}")
    config, state = _load(Path(model_path))
    dataset = PreparedDataset(prepared_dir)
    if config["name"] == "knn":
        from sklearn.neighbors import KNeighborsClassifier

        from vesselseg.baselines.knn import predict_proba_image

        clf = KNeighborsClassifier(n_neighbors=int(state["k"]), n_jobs=_query_jobs())
        clf.fit(state["X"].numpy(), state["y"].numpy())

        def probability(it: Item) -> np.ndarray:
            return predict_proba_image(clf, it.image, it.fov)
    else:
        from vesselseg.baselines.vesselness import frangi_vesselness

        sigmas = [float(s) for s in state["sigmas"].tolist()]
        black, t = bool(state["black_ridges"]), float(state["threshold"])

        def probability(it: Item) -> np.ndarray:
            return vesselness_to_probability(frangi_vesselness(it.image, it.fov, sigmas=sigmas, black_ridges=black), t)

    t0 = time.monotonic()
    counts: dict[str, int] = {}
    with atomic.atomic_dir(out_dir) as tmp:
        for split in splits:
            items = _grey_items(dataset, split, Path(prepared_dir))
            (tmp / split / "probs").mkdir(parents=True)
            (tmp / split / "masks").mkdir(parents=True)
            for it in tqdm(items, desc=f"{config['name']} {split}", unit="img", disable=None):
                probs = np.clip(probability(it), 0.0, 1.0).astype(np.float32)
                atomic.write_npy(tmp / split / "probs" / f"{it.id}.npy", probs)
                io.write_png(tmp / split / "masks" / f"{it.id}.png", probs >= threshold)
            counts[split] = len(items)
    seconds = time.monotonic() - t0
    log.info("%s predictions for %s in %.1f s", config["name"], counts, seconds)
    return {"n_images": sum(counts.values()), "seconds_total": round(seconds, 2), "splits": counts}
