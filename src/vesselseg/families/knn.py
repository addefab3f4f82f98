"""The k-NN family (``knn``): a pixel classifier on 3x3 grey-level neighbourhoods.

The classic supervised baseline (Niemeijer et al. 2004 style, reduced to raw
intensities): each pixel is described by itself and its 8 neighbours, and a
scikit-learn ``KNeighborsClassifier`` votes.  It shows how much a CNN gains over a
purely local, non-learned-feature model.

Background pixels outnumber vessel pixels about 9:1, and most background is easy;
:func:`sample_training_pixels` therefore keeps every vessel pixel, every background
pixel close to a vessel (the hard negatives that decide vessel width), and only a
random ``background_keep`` share of the rest, then caps the total so that fitting
and the grid search stay fast (k-NN prediction cost grows with the training set).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from tqdm import tqdm

from vesselseg.errors import DataError, ParamsError
from vesselseg.families.classical import ClassicalFamily, Fitted, grey_items, query_jobs
from vesselseg.params import Params
from vesselseg.prepared import Item, PreparedDataset

log = logging.getLogger(__name__)

__all__ = ["FAMILY", "KnnFamily", "fit_knn", "neighbourhood_features", "predict_proba_image", "sample_training_pixels"]


def _check_image(image: np.ndarray, what: str = "image") -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 2 or image.dtype != np.uint8:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise DataError(f"{what}: expected a uint8 (H, W) array, got shape {shape} dtype {dtype}")


def neighbourhood_features(image: np.ndarray) -> np.ndarray:
    """``(H*W, 9)`` float32 in [0, 1]: each pixel's 3x3 window in row-major order.

    Column 4 is the pixel itself.  Borders are mirrored (``reflect``) so edge
    pixels get a full window without inventing a black frame.
    """
    _check_image(image)
    padded = np.pad(image, 1, mode="reflect") if min(image.shape) > 1 else np.pad(image, 1, mode="edge")
    windows = sliding_window_view(padded, (3, 3))  # (H, W, 3, 3), a view
    return windows.reshape(-1, 9).astype(np.float32) / 255.0


def sample_training_pixels(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    fovs: Sequence[np.ndarray | None] | None = None,
    *,
    background_keep: float = 0.3,
    near_vessel_px: int = 3,
    max_pixels: int | None = 50_000,
    rng: np.random.Generator | int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Training set ``(X (n, 9) float32, y (n,) uint8)`` from whole images.

    Only pixels inside the FOV are used.  ``background_keep`` is the share of far
    background kept (0.3 drops ~70 %); background within ``near_vessel_px`` pixels
    (Euclidean) of a vessel is always kept.  If more than ``max_pixels`` remain, a
    uniform random subset is drawn, which keeps the class ratio in expectation.
    """
    if not 0.0 <= background_keep <= 1.0:
        raise ParamsError(f"background_keep must be in [0, 1], got {background_keep!r}")
    if near_vessel_px < 0:
        raise ParamsError(f"near_vessel_px must be >= 0, got {near_vessel_px!r}")
    if max_pixels is not None and max_pixels < 2:
        raise ParamsError(f"max_pixels must be >= 2 or None, got {max_pixels!r}")
    if len(images) != len(labels) or (fovs is not None and len(fovs) != len(images)):
        raise DataError(
            f"got {len(images)} images, {len(labels)} labels and {len(fovs) if fovs is not None else '-'} FOV masks"
        )
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        _check_image(image, f"image #{i}")
        fov = None if fovs is None else fovs[i]
        if label.shape != image.shape or (fov is not None and fov.shape != image.shape):
            raise DataError(f"image #{i}: label/FOV shape differs from image shape {image.shape}")
        vessel = label > 0
        inside = np.ones(image.shape, bool) if fov is None else fov > 0
        if vessel.any() and near_vessel_px > 0:
            near = ndimage.distance_transform_edt(~vessel) <= near_vessel_px
        else:
            near = vessel
        keep = inside & (vessel | near | (rng.random(image.shape) < background_keep))
        xs.append(neighbourhood_features(image)[keep.ravel()])
        ys.append(vessel[keep].astype(np.uint8))
    X = np.concatenate(xs) if xs else np.zeros((0, 9), np.float32)
    y = np.concatenate(ys) if ys else np.zeros(0, np.uint8)
    if max_pixels is not None and len(y) > max_pixels:
        idx = np.sort(rng.choice(len(y), size=max_pixels, replace=False))
        X, y = X[idx], y[idx]
    log.info("k-NN training pixels: %d (%.1f%% vessel)", len(y), 100.0 * y.mean() if len(y) else 0.0)
    return X, y


def fit_knn(
    X: np.ndarray,
    y: np.ndarray,
    *,
    k_grid: Sequence[int] = (3, 5, 7, 9),
    cv: int = 3,
    seed: int = 0,
    scoring: str = "f1",
) -> tuple[KNeighborsClassifier, int]:
    """Pick k by stratified ``cv``-fold grid search, refit on all pixels.

    ``scoring="f1"`` because the vessel-class F1 is the Dice the pipeline reports.
    Returns ``(fitted classifier, best k)``.
    """
    if X.ndim != 2 or len(X) != len(y):
        raise DataError(f"k-NN training data: X {X.shape} and y {y.shape} do not match")
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise DataError(f"k-NN training pixels hold only class {classes.tolist()}; need vessel and background")
    if cv < 2 or counts.min() < cv:
        raise ParamsError(f"cv must be >= 2 and <= the smallest class count ({counts.min()}), got {cv}")
    k_grid = [int(k) for k in k_grid]
    if not k_grid or min(k_grid) < 1 or max(k_grid) > len(y) * (cv - 1) // cv:
        raise ParamsError(f"k_grid {k_grid} must hold k >= 1 and <= the training fold size ({len(y) * (cv - 1) // cv})")
    search = GridSearchCV(
        KNeighborsClassifier(),
        {"n_neighbors": k_grid},
        cv=StratifiedKFold(n_splits=cv, shuffle=True, random_state=seed),
        scoring=scoring,
        n_jobs=1,
        refit=True,
    )
    search.fit(X, y)
    best_k = int(search.best_params_["n_neighbors"])
    log.info("k-NN grid search: best k=%d (%s %.4f)", best_k, scoring, search.best_score_)
    return search.best_estimator_, best_k


def predict_proba_image(
    model: KNeighborsClassifier,
    image: np.ndarray,
    fov: np.ndarray | None = None,
    *,
    chunk: int = 65_536,
    progress: bool | None = None,
) -> np.ndarray:
    """Vessel probability ``(H, W)`` float32 (share of the k neighbours that are vessel).

    Pixels outside ``fov`` are not queried (k-NN queries are the slow part) and get 0.
    ``progress=None`` shows a bar only on a terminal.
    """
    _check_image(image)
    if fov is not None and fov.shape != image.shape:
        raise DataError(f"FOV shape {fov.shape} differs from image shape {image.shape}")
    feats = neighbourhood_features(image)
    where = np.arange(feats.shape[0]) if fov is None else np.flatnonzero(fov.ravel() > 0)
    out = np.zeros(feats.shape[0], np.float32)
    vessel_col = list(model.classes_).index(1) if 1 in model.classes_ else None
    if vessel_col is None:
        return out.reshape(image.shape)
    starts = range(0, len(where), chunk)
    for s in tqdm(starts, desc="k-NN", unit="chunk", disable=None if progress is None else not progress, leave=False):
        idx = where[s : s + chunk]
        out[idx] = model.predict_proba(feats[idx])[:, vessel_col]
    return out.reshape(image.shape)


class KnnFamily(ClassicalFamily):
    """k chosen by cross-validation on the training pixels; the training pixels *are* the model."""

    name = "knn"
    state_keys = ("X", "y", "k")

    def fit_model(self, params: Params, dataset: PreparedDataset) -> Fitted:
        p = params.model.knn
        train = grey_items(dataset, "train")
        X, y = sample_training_pixels(
            [it.image for it in train],
            [it.label for it in train],
            [it.fov for it in train],
            background_keep=p.background_keep,
            near_vessel_px=p.near_vessel_px,
            max_pixels=p.max_pixels,
            rng=np.random.default_rng(params.seed),
        )
        clf, best_k = fit_knn(X, y, k_grid=p.k_grid, cv=p.cv, seed=params.seed)
        clf.set_params(n_jobs=query_jobs())
        val = grey_items(dataset, "val")
        probs = [
            predict_proba_image(clf, it.image, it.fov) for it in tqdm(val, desc="k-NN val", unit="img", disable=None)
        ]
        # store the training pixels so predict refits the same classifier
        state = {
            "X": torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)),
            "y": torch.from_numpy(np.ascontiguousarray(y, dtype=np.uint8)),
            "k": torch.tensor(best_k, dtype=torch.int64),
        }
        info = {"best_k": best_k, "n_train_pixels": len(y), "train_vessel_fraction": round(float(y.mean()), 6)}
        return Fitted({"name": self.name, "k": best_k}, state, info, probs, val)

    def probability_function(
        self, config: dict[str, Any], state: dict[str, torch.Tensor]
    ) -> Callable[[Item], np.ndarray]:
        clf = KNeighborsClassifier(n_neighbors=int(state["k"]), n_jobs=query_jobs())
        clf.fit(state["X"].numpy(), state["y"].numpy())

        def probability(it: Item) -> np.ndarray:
            return predict_proba_image(clf, it.image, it.fov)

        return probability


FAMILY = KnnFamily()
