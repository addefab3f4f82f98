"""Segmentation metrics inside the field of view, pooled without keeping pixels.

Threshold metrics come from exact integer confusion counts.  Ranking metrics (ROC AUC,
ROC and precision-recall curves) come from a histogram of probabilities per class
with ``n_bins`` equal bins on [0, 1] plus one bin for exactly 1.0.  Why a histogram
and not sklearn or an exact sort: histograms of many images add up, so a whole split
(HRF: 45 images of 8 M pixels) is pooled in a few MB instead of concatenating every
pixel, and it is fast.  Measured on this machine, 6.6 M saturated "trained-net"
probabilities: ``sklearn.metrics.roc_auc_score`` 5.0 s, an exact rank sum
(``scipy.stats.rankdata``) 2.6 s, the histogram 0.16 s with 2**20 bins (error
4e-9) and 0.12 s with 2**16 bins (error 1e-7); 2**24 bins took 1.5 s.

Exactness: ``n_bins`` is a power of two, so ``floor(p * n_bins)`` is computed without
rounding and "bin >= k" is exactly "p >= k / n_bins".  Every curve point is therefore
an exact (fpr, tpr) of the rule ``p >= threshold``, and the only approximation in the
AUC is that two probabilities in the same bin (closer than 2**-20 ~ 1e-6) count as a
tie (half a pair).  Probabilities that are really tied are handled exactly, as in
sklearn.  The error grows only when all probabilities crowd into a tiny range: with
every value in [0, 1e-3] (an untrained net) it was 5e-5; raise ``n_bins`` for that.

Zero-denominator conventions (so no metric is ever NaN, and every value is valid
JSON for DVC):

- dice, iou: 1.0 when the label and the prediction are both empty (perfect agreement
  on "no vessel"); any false positive then gives 0.0.
- sensitivity (recall): 1.0 when the label has no positives (nothing to miss).
- specificity: 1.0 when the label has no negatives (nothing to wrongly flag).
- precision: with no positive predictions, 1.0 if the label has no positives either,
  else 0.0 (everything was missed).
- balanced_accuracy: the mean of sensitivity and specificity as defined above.
- accuracy: 1.0 for zero pixels (callers should refuse an empty FOV first).
- auc_roc: ``None`` when the pixels hold only one class (the AUC does not exist); the
  evaluate stage leaves that cell empty and leaves the key out of pooled metrics.
- log_loss: mean natural-log binary cross-entropy with probabilities clipped to
  [eps, 1 - eps]; 0.0 for zero pixels.

Prediction rule everywhere: a pixel is foreground when ``prob >= threshold`` (as
sklearn's curves count it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "DEFAULT_BINS",
    "METRIC_NAMES",
    "SCORE_NAMES",
    "Curve",
    "MetricAccumulator",
    "ProbHistogram",
    "auc_roc",
    "confusion",
    "image_metrics",
    "log_loss",
    "pr_curve",
    "roc_curve",
    "scores_from_confusion",
]

DEFAULT_BINS = 2**20
SCORE_NAMES = ("dice", "iou", "accuracy", "sensitivity", "specificity", "precision", "balanced_accuracy")
METRIC_NAMES = (*SCORE_NAMES, "auc_roc", "log_loss")


def _select(arr: np.ndarray, mask: np.ndarray | None, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Flatten ``arr`` to the pixels inside ``mask``, after checking shapes agree."""
    arr = np.asarray(arr)
    if arr.shape != shape:
        raise ValueError(f"{name} shape {arr.shape} differs from target shape {shape}")
    if mask is None:
        return arr.reshape(-1)
    return arr[mask]


def _as_bool(arr: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype != bool:
        raise ValueError(f"{name} must be a bool array, got dtype {arr.dtype}")
    return arr


def _flat_inputs(
    values: np.ndarray, target: np.ndarray, mask: np.ndarray | None, name: str
) -> tuple[np.ndarray, np.ndarray]:
    target = _as_bool(target, "target")
    if mask is not None:
        mask = _as_bool(mask, "mask")
        if mask.shape != target.shape:
            raise ValueError(f"mask shape {mask.shape} differs from target shape {target.shape}")
    return _select(values, mask, name, target.shape), _select(target, mask, "target", target.shape)


def _check_probs(p: np.ndarray) -> np.ndarray:
    if not np.issubdtype(p.dtype, np.floating):
        raise ValueError(f"probs must be a float array, got dtype {p.dtype}")
    if p.size and not (np.isfinite(p).all() and p.min() >= 0.0 and p.max() <= 1.0):
        raise ValueError("probs must be finite and within [0, 1]")
    return p


def confusion(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> tuple[int, int, int, int]:
    """Exact ``(tp, fp, fn, tn)`` inside ``mask`` (all pixels when ``None``).

    Integer counts, never float sums, so pooling millions of pixels loses nothing.
    """
    p, t = _flat_inputs(_as_bool(pred, "pred"), target, mask, "pred")
    tp = int(np.count_nonzero(p & t))
    n_pred = int(np.count_nonzero(p))
    n_true = int(np.count_nonzero(t))
    fp = n_pred - tp
    fn = n_true - tp
    tn = int(p.size) - tp - fp - fn
    return tp, fp, fn, tn


def scores_from_confusion(tp: int, fp: int, fn: int, tn: int) -> dict[str, float]:
    """Threshold metrics from counts; zero denominators follow the module docstring."""
    if min(tp, fp, fn, tn) < 0:
        raise ValueError(f"confusion counts must be >= 0, got tp={tp} fp={fp} fn={fn} tn={tn}")
    pos, neg, total = tp + fn, fp + tn, tp + fp + fn + tn
    sens = tp / pos if pos else 1.0
    spec = tn / neg if neg else 1.0
    prec = tp / (tp + fp) if tp + fp else (1.0 if pos == 0 else 0.0)
    dice_den = 2 * tp + fp + fn
    return {
        "dice": 2 * tp / dice_den if dice_den else 1.0,
        "iou": tp / (tp + fp + fn) if tp + fp + fn else 1.0,
        "accuracy": (tp + tn) / total if total else 1.0,
        "sensitivity": sens,
        "specificity": spec,
        "precision": prec,
        "balanced_accuracy": (sens + spec) / 2.0,
    }


@dataclass
class Curve:
    """A curve as parallel arrays, from the strictest threshold to the loosest.

    Point ``i`` is the rule ``prob >= threshold[i]``; the first threshold lies just
    above the highest probability (nothing predicted; may exceed 1.0), the last is 0
    or the lowest occupied bin edge (everything predicted).
    """

    x: np.ndarray
    y: np.ndarray
    threshold: np.ndarray


class ProbHistogram:
    """Per-class counts of probabilities in ``n_bins`` equal bins (+1 for p == 1.0).

    Histograms of different images add, which is what makes pooled AUC and curves
    possible in bounded memory.
    """

    def __init__(self, n_bins: int = DEFAULT_BINS) -> None:
        if n_bins < 2 or n_bins & (n_bins - 1):
            raise ValueError(f"n_bins must be a power of two >= 2 (exact bin edges), got {n_bins}")
        self.n_bins = n_bins
        self.pos = np.zeros(n_bins + 1, dtype=np.int64)
        self.neg = np.zeros(n_bins + 1, dtype=np.int64)

    def add(self, probs: np.ndarray, target: np.ndarray) -> None:
        """Count flat, already validated probabilities and bool targets."""
        nb = self.n_bins + 1
        idx = self.bin_index(probs)
        idx += target * np.int64(nb)  # positives go to the upper half of one bincount
        counts = np.bincount(idx, minlength=2 * nb)
        self.neg += counts[:nb]
        self.pos += counts[nb:]

    def bin_index(self, probs: np.ndarray) -> np.ndarray:
        """``floor(p * n_bins)``, exact: scaling by a power of two does not round.

        float16 is widened first (its range ends at 65504); truncation is the floor
        because probabilities are >= 0.
        """
        if probs.dtype not in (np.float32, np.float64):
            probs = probs.astype(np.float32)
        return (probs * self.n_bins).astype(np.int64)

    def merge(self, other: ProbHistogram) -> None:
        if other.n_bins != self.n_bins:
            raise ValueError(f"cannot merge histograms with {self.n_bins} and {other.n_bins} bins")
        self.pos += other.pos
        self.neg += other.neg

    @property
    def n_pos(self) -> int:
        return int(self.pos.sum())

    @property
    def n_neg(self) -> int:
        return int(self.neg.sum())

    def auc(self) -> float | None:
        """Mann-Whitney AUC; pairs sharing a bin count half.  ``None`` if one class."""
        n_pos, n_neg = self.n_pos, self.n_neg
        if n_pos == 0 or n_neg == 0:
            return None
        # Only occupied bins matter; compressing first keeps per-image cost low.
        occupied = np.flatnonzero(self.pos + self.neg)
        pos = self.pos[occupied].astype(np.float64)
        neg = self.neg[occupied].astype(np.float64)
        pos_above = n_pos - np.cumsum(pos)  # positives in strictly higher bins
        wins = np.dot(neg, pos_above + 0.5 * pos)
        return float(wins / (float(n_pos) * float(n_neg)))

    def _vertices(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cumulative (tp, fp, threshold) for every threshold that changes a count.

        Ordered from the strictest threshold (nothing predicted) to 0 (all predicted).
        """
        occupied = np.flatnonzero((self.pos + self.neg) > 0)[::-1]
        tp = np.concatenate([[0], np.cumsum(self.pos[occupied])])
        fp = np.concatenate([[0], np.cumsum(self.neg[occupied])])
        top = (occupied[0] + 1) if occupied.size else self.n_bins + 1
        thr = np.concatenate([[top], occupied]).astype(np.float64) / self.n_bins
        return tp, fp, thr

    def roc(self, n_points: int) -> Curve:
        """ROC points (fpr, tpr) at no more than ``n_points`` exact thresholds."""
        tp, fp, thr = self._vertices()
        tpr = tp / self.n_pos if self.n_pos else np.ones_like(tp, dtype=np.float64)
        fpr = fp / self.n_neg if self.n_neg else np.zeros_like(fp, dtype=np.float64)
        keep = _downsample(fpr, tpr, n_points)
        return Curve(fpr[keep], tpr[keep], thr[keep])

    def pr(self, n_points: int) -> Curve:
        """Precision-recall points; the "predict nothing" end has precision 1, recall 0."""
        tp, fp, thr = self._vertices()
        recall = tp / self.n_pos if self.n_pos else np.ones_like(tp, dtype=np.float64)
        pred = tp + fp
        precision = np.divide(tp, pred, out=np.ones_like(tp, dtype=np.float64), where=pred > 0)
        keep = _downsample(recall, precision, n_points)
        return Curve(recall[keep], precision[keep], thr[keep])


def _downsample(x: np.ndarray, y: np.ndarray, n_points: int) -> np.ndarray:
    """Indices of at most ``n_points`` vertices spread evenly along the curve's length.

    Even spacing in arc length (not in threshold) keeps the bend of a saturated
    network's curve, where thresholds crowd near 0 and 1; both ends are always kept.
    """
    if n_points < 2:
        raise ValueError(f"n_points must be >= 2, got {n_points}")
    if x.size <= n_points:
        return np.arange(x.size)
    seg = np.hypot(np.diff(x), np.diff(y))
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    if arc[-1] == 0.0:
        return np.array([0, x.size - 1])
    targets = np.linspace(0.0, arc[-1], n_points)
    idx = np.searchsorted(arc, targets, side="left").clip(0, x.size - 1)
    return np.unique(np.concatenate([[0], idx, [x.size - 1]]))


def _histogram(probs: np.ndarray, target: np.ndarray, mask: np.ndarray | None, n_bins: int) -> ProbHistogram:
    p, t = _flat_inputs(probs, target, mask, "probs")
    hist = ProbHistogram(n_bins)
    hist.add(_check_probs(p), t)
    return hist


def auc_roc(
    probs: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None, *, n_bins: int = DEFAULT_BINS
) -> float | None:
    """ROC AUC inside ``mask``; ``None`` when only one class is present."""
    return _histogram(probs, target, mask, n_bins).auc()


def _log_loss_sum(p: np.ndarray, t: np.ndarray, eps: float) -> float:
    p = np.clip(p.astype(np.float64), eps, 1.0 - eps)
    return float(-(np.log(p[t]).sum() + np.log1p(-p[~t]).sum()))


def log_loss(probs: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy (natural log) inside ``mask``; 0.0 for no pixels."""
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps}")
    p, t = _flat_inputs(probs, target, mask, "probs")
    _check_probs(p)
    return _log_loss_sum(p, t, eps) / p.size if p.size else 0.0


def roc_curve(
    probs: np.ndarray,
    target: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    n_points: int = 201,
    n_bins: int = DEFAULT_BINS,
) -> Curve:
    """ROC curve (x = fpr, y = tpr) with at most ``n_points`` points."""
    return _histogram(probs, target, mask, n_bins).roc(n_points)


def pr_curve(
    probs: np.ndarray,
    target: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    n_points: int = 201,
    n_bins: int = DEFAULT_BINS,
) -> Curve:
    """Precision-recall curve (x = recall, y = precision), at most ``n_points`` points."""
    return _histogram(probs, target, mask, n_bins).pr(n_points)


def image_metrics(
    probs: np.ndarray,
    target: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    threshold: float = 0.5,
    eps: float = 1e-7,
    n_bins: int = DEFAULT_BINS,
) -> dict[str, float | None]:
    """Every metric of :data:`METRIC_NAMES` for one image (auc_roc may be ``None``)."""
    acc = MetricAccumulator(threshold=threshold, eps=eps, n_bins=n_bins)
    return acc.update(probs, target, mask)


class MetricAccumulator:
    """Pools metrics over many images in bounded memory.

    Keeps integer confusion counts, a per-class probability histogram (for the pooled
    AUC and curves) and the log-loss sum; no pixel is kept.  Pooled results equal the
    metrics of all FOV pixels concatenated.
    """

    def __init__(self, *, threshold: float = 0.5, eps: float = 1e-7, n_bins: int = DEFAULT_BINS) -> None:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        if not 0.0 < eps < 0.5:
            raise ValueError(f"eps must be in (0, 0.5), got {eps}")
        self.threshold = threshold
        self.eps = eps
        self.hist = ProbHistogram(n_bins)
        self.counts = np.zeros(4, dtype=np.int64)  # tp, fp, fn, tn
        self.loss_sum = 0.0
        self.n_pixels = 0
        self.n_images = 0

    def update(self, probs: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float | None]:
        """Add one image; return its own metrics (computed from the same counts)."""
        p, t = _flat_inputs(probs, target, mask, "probs")
        _check_probs(p)
        pred = p >= self.threshold
        counts = confusion(pred, t)
        image_hist = ProbHistogram(self.hist.n_bins)
        image_hist.add(p, t)
        loss_sum = _log_loss_sum(p, t, self.eps)
        self.counts += np.asarray(counts, dtype=np.int64)
        self.hist.merge(image_hist)
        self.loss_sum += loss_sum
        self.n_pixels += int(p.size)
        self.n_images += 1
        out: dict[str, float | None] = dict(scores_from_confusion(*counts))
        out["auc_roc"] = image_hist.auc()
        out["log_loss"] = loss_sum / p.size if p.size else 0.0
        return out

    def confusion(self) -> tuple[int, int, int, int]:
        tp, fp, fn, tn = (int(c) for c in self.counts)
        return tp, fp, fn, tn

    def result(self) -> dict[str, float | None]:
        """Pooled metrics over every pixel added so far."""
        out: dict[str, float | None] = dict(scores_from_confusion(*self.confusion()))
        out["auc_roc"] = self.hist.auc()
        out["log_loss"] = self.loss_sum / self.n_pixels if self.n_pixels else 0.0
        return out

    def roc_curve(self, n_points: int = 201) -> Curve:
        return self.hist.roc(n_points)

    def pr_curve(self, n_points: int = 201) -> Curve:
        return self.hist.pr(n_points)
