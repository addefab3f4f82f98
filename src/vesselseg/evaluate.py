"""The evaluate step: probability maps + prepared labels -> metrics, curves, overlays.

Inputs::

    <prepared_dir>/{images,labels,fov}/<id>.png, split.json   (vesselseg.prepared)
    <predictions_dir>/<split>/probs/<id>.npy                  float (H, W) in [0, 1]

Outputs (every one written atomically, and only after every image was read and
scored, so a bad input file leaves the previous outputs untouched)::

    metrics_path      {"test": {metric: value, ..., "n_images": k}, "val": {...}}
    per_image_path    CSV: split, id, dice, ..., auc_roc, log_loss, cldice, cl_precision,
                      cl_sensitivity, betti0_error, betti1_error, cal (sorted by split, id)
    plots_dir/roc.csv split, fpr, tpr, threshold   (test split; val when there is no test)
    plots_dir/pr.csv  split, recall, precision, threshold
    overlays_dir/<id>.png  four-panel figures of the first test images (by id)

Metrics are pooled over the FOV pixels of a split (the DRIVE protocol), not averaged
over images; the per-image table is there to find the bad images.  A pixel counts as
vessel when ``prob >= threshold``, the rule the predict step uses for its masks.
Topology metrics (:mod:`vesselseg.topology`) are computed on the same masks inside
the FOV: ``cldice`` is pooled from summed skeleton counts, ``betti0_error``,
``betti1_error`` and ``cal`` are means over the images of a split.
Outputs are byte-identical for identical inputs (sorted keys, fixed float formats),
so DVC sees no change when nothing changed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from vesselseg import atomic, figures, imagefiles
from vesselseg.errors import DataError, ParamsError
from vesselseg.imagefiles import image_size
from vesselseg.metrics import DEFAULT_BINS, METRIC_NAMES, Curve, MetricAccumulator
from vesselseg.prepared import SPLITS, PreparedDataset
from vesselseg.preprocess.spec import to_native
from vesselseg.topology import TOPOLOGY_NAMES, TopologyAccumulator

__all__ = ["FLOAT_FORMAT", "PER_IMAGE_COLUMNS", "run_evaluate"]

log = logging.getLogger(__name__)

PER_IMAGE_COLUMNS = ("split", "id", *METRIC_NAMES, *TOPOLOGY_NAMES)
FLOAT_FORMAT = "%.6f"
_DECIMALS = 6


@dataclass(frozen=True)
class _Job:
    split: str
    id: str
    probs_path: Path


def _probs_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    if not path.is_file():
        raise DataError(f"{path}: prediction file not found; run the predict stage first")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as err:  # numpy raises ValueError/OSError/EOFError for broken files
        raise DataError(f"{path}: not a readable .npy file ({type(err).__name__}: {err})") from None
    return tuple(arr.shape), arr.dtype


def _validate(ds: PreparedDataset, predictions_dir: Path, splits: Sequence[str]) -> list[_Job]:
    """Check that every input exists and every shape agrees, before any work."""
    jobs: list[_Job] = []
    for split in splits:
        if split not in SPLITS:
            raise ParamsError(f"evaluate: unknown split {split!r}; choose from {list(SPLITS)}")
        ids = sorted(ds.ids(split))
        if not ids:
            log.warning("split '%s' has no images; it is left out of the metrics", split)
            continue
        for id_ in ids:
            img_p, lab_p, fov_p = ds.paths(id_)
            shape = image_size(img_p)
            for path in (lab_p, fov_p):
                other = image_size(path)
                if other != shape:
                    raise DataError(f"{path}: size {other[1]}x{other[0]} differs from its image {shape[1]}x{shape[0]}")
            probs_p = predictions_dir / split / "probs" / f"{id_}.npy"
            p_shape, p_dtype = _probs_header(probs_p)
            if p_shape != shape:
                raise DataError(f"{probs_p}: shape {p_shape} differs from its image {img_p} {shape}")
            if not np.issubdtype(p_dtype, np.floating):
                raise DataError(f"{probs_p}: probabilities must be float, got dtype {p_dtype}")
            jobs.append(_Job(split, id_, probs_p))
    if not jobs:
        raise DataError(f"{ds.root / 'split.json'}: no images in splits {list(splits)}; nothing to evaluate")
    return jobs


def _load_probs(path: Path) -> np.ndarray:
    probs = np.load(path, allow_pickle=False)
    if not np.isfinite(probs).all():
        raise DataError(f"{path}: probabilities hold NaN or Inf")
    lo, hi = float(probs.min()), float(probs.max())
    if lo < 0.0 or hi > 1.0:
        raise DataError(f"{path}: probabilities must lie in [0, 1], found [{lo:.4g}, {hi:.4g}]")
    return probs


def _rounded(values: dict[str, Any]) -> dict[str, Any]:
    return {k: round(float(v), _DECIMALS) if isinstance(v, float) else v for k, v in values.items()}


def _pooled(split: str, acc: MetricAccumulator, topo: TopologyAccumulator) -> dict[str, Any]:
    result: dict[str, Any] = {**acc.result(), **topo.result()}
    if result["auc_roc"] is None:
        # JSON null breaks DVC's metric tables; an absent key shows as "-".
        log.warning("split '%s': labels hold one class only; auc_roc is undefined and left out", split)
        del result["auc_roc"]
    out = _rounded(result)
    out["n_images"] = acc.n_images
    return out


def _curve_frame(curves: dict[str, Curve], x: str, y: str) -> pd.DataFrame:
    frames = [pd.DataFrame({"split": split, x: c.x, y: c.y, "threshold": c.threshold}) for split, c in curves.items()]
    return pd.concat(frames, ignore_index=True)


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    text = frame.to_csv(index=False, float_format=FLOAT_FORMAT, na_rep="", lineterminator="\n")
    atomic.write_text(path, text)


def run_evaluate(
    *,
    prepared_dir: Path,
    predictions_dir: Path,
    metrics_path: Path,
    per_image_path: Path,
    plots_dir: Path,
    overlays_dir: Path,
    threshold: float,
    splits: Sequence[str] = ("val", "test"),
    n_overlays: int = 3,
    curve_points: int = 201,
    n_bins: int = DEFAULT_BINS,
) -> dict[str, dict[str, Any]]:
    """Score every prediction of ``splits`` and write metrics, curves and overlays.

    Returns the pooled metrics exactly as written to ``metrics_path``.
    """
    if not 0.0 < float(threshold) < 1.0:
        raise ParamsError(f"predict.threshold must be > 0 and < 1, got {threshold!r}")
    if curve_points < 2:
        raise ParamsError(f"evaluate.curve_points must be >= 2, got {curve_points!r}")
    if n_overlays < 0:
        raise ParamsError(f"evaluate.n_overlays must be >= 0, got {n_overlays!r}")
    prepared_dir, predictions_dir = Path(prepared_dir), Path(predictions_dir)
    ds = PreparedDataset(prepared_dir)
    jobs = _validate(ds, predictions_dir, splits)

    overlay_split = "test" if "test" in splits else splits[0]
    overlay_ids = {j.id for j in jobs if j.split == overlay_split}
    overlay_ids = set(sorted(overlay_ids)[:n_overlays])

    accs = {s: MetricAccumulator(threshold=threshold, n_bins=n_bins) for s in splits if any(j.split == s for j in jobs)}
    topo_accs = {s: TopologyAccumulator() for s in accs}
    rows: list[dict[str, Any]] = []
    overlays: dict[str, np.ndarray] = {}
    for job in tqdm(jobs, desc="evaluate", unit="img", disable=None):
        item = ds.load(job.id)
        if not item.fov.any():
            raise DataError(f"{ds.paths(job.id)[2]}: FOV mask is empty; no pixel of '{job.id}' can be scored")
        probs = _load_probs(job.probs_path)
        label, fov, scored = item.label, item.fov, probs
        native = ds.native(job.id)
        if native is not None:  # resized by prepare: scored at its native resolution
            label, fov = native
            scored = to_native(probs, label.shape)
        scores = accs[job.split].update(scored, label, fov)
        topo = topo_accs[job.split].update(scored >= threshold, label, fov)
        pred = probs >= threshold
        rows.append({"split": job.split, "id": job.id, **scores, **topo})
        if job.split == overlay_split and job.id in overlay_ids:
            overlays[job.id] = figures.overlay(item.image, pred, item.label, item.fov, probs=probs)

    metrics = {split: _pooled(split, acc, topo_accs[split]) for split, acc in accs.items()}
    per_image = pd.DataFrame(rows, columns=list(PER_IMAGE_COLUMNS)).sort_values(["split", "id"], kind="stable")
    per_image["auc_roc"] = per_image["auc_roc"].astype(float)  # None -> NaN -> empty cell
    # Curves of one split only: DVC's plot templates cannot group rows by a column,
    # so two splits in one file would draw as one zig-zag line.  The reported split
    # is test, or val where a dataset has no test split (the OCTA-500 2D copy).
    curve_split = "test" if "test" in accs else next(iter(accs))
    curve_accs = {curve_split: accs[curve_split]}
    roc = _curve_frame({s: a.roc_curve(curve_points) for s, a in curve_accs.items()}, "fpr", "tpr")
    pr = _curve_frame({s: a.pr_curve(curve_points) for s, a in curve_accs.items()}, "recall", "precision")

    atomic.write_json(metrics_path, metrics)
    _write_csv(Path(per_image_path), per_image)
    _write_csv(Path(plots_dir) / "roc.csv", roc)
    _write_csv(Path(plots_dir) / "pr.csv", pr)
    with atomic.atomic_dir(overlays_dir) as tmp:
        for id_, panel in overlays.items():
            imagefiles.write_png(tmp / f"{id_}.png", panel)
    for split, values in metrics.items():
        log.info(
            "%s: dice %.4f  auc %s  cldice %.4f  betti0/1 error %.2f/%.2f  cal %.4f  (%d images)",
            split,
            values["dice"],
            f"{values['auc_roc']:.4f}" if "auc_roc" in values else "n/a",
            values["cldice"],
            values["betti0_error"],
            values["betti1_error"],
            values["cal"],
            values["n_images"],
        )
    return metrics
