"""Where a trained model's last point of Dice goes: threshold, stray blobs, vessel width, variance.

When a recipe stops improving (issue 15: OCTA-500 3M validation Dice flat at 0.921
whatever the schedule, width or averaging), the next lever depends on what the
remaining errors are.  This script predicts a split with one or more models, exactly
as ``vesselseg segment`` does (the model file's own preprocessing and window, plus
``--tta``), and prints four tables, all FOV-pooled at the native resolution (the
evaluate stage's rule):

1. **threshold**: pooled Dice at thresholds around 0.5.  A calibrated model peaks at
   0.5; a peak elsewhere says the loss biases the vessel width.
2. **small components**: Dice after deleting predicted 8-connected components smaller
   than N pixels.  A gain says stray blobs (false vessels away from the tree) cost Dice.
3. **error anatomy**: false positives and false negatives inside the boundary band
   (pixels whose 3x3 neighbourhood holds both label classes: one pixel too wide or too
   thin) against those away from it (missed or invented vessel segments), and the Dice
   each kind would leave if it were fixed alone.  This is the ceiling of any remedy
   aimed at that kind.
4. **ensemble** (two or more ``--model``): each model alone and the mean of their
   probabilities; a gain says the errors are variance that averaging removes.

Usage::

    python benchmarks/error_anatomy.py --model models/model.pt --prepared data/prepared --split val
    python benchmarks/error_anatomy.py --model a.pt --model b.pt --prepared P --split val --tta d4

``VESSELSEG_THREADS`` (default 2) sets the torch threads.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import header, print_table  # noqa: E402

from vesselseg.metrics import confusion  # noqa: E402

THRESHOLDS = (0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7)
MIN_SIZES = (0, 10, 25, 50, 100)
EIGHT = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Case:
    """One scored image: its probabilities (native size), label and FOV."""

    id: str
    probs: np.ndarray
    label: np.ndarray
    fov: np.ndarray


def dice_of(counts: Sequence[int]) -> float:
    tp, fp, fn = counts[0], counts[1], counts[2]
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0


def pooled(cases: Sequence[Case], binarise: Callable[[np.ndarray], np.ndarray]) -> float:
    """Pooled Dice of the masks ``binarise(probs)`` over all cases (integer counts)."""
    tp = fp = fn = 0
    for c in cases:
        t, f, n, _ = confusion(binarise(c.probs), c.label, c.fov)
        tp, fp, fn = tp + t, fp + f, fn + n
    return dice_of((tp, fp, fn))


def remove_small(mask: np.ndarray, min_size: int) -> np.ndarray:
    """``mask`` without its 8-connected components of fewer than ``min_size`` pixels."""
    if min_size <= 0:
        return mask
    labels, _ = ndimage.label(mask, structure=EIGHT)
    keep = np.bincount(labels.ravel()) >= min_size
    keep[0] = False
    return keep[labels]


def boundary_band(label: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood holds both classes; the image edge is not a boundary."""
    return ndimage.binary_dilation(label, EIGHT) & ~ndimage.binary_erosion(label, EIGHT, border_value=1)


def anatomy(cases: Sequence[Case], threshold: float = 0.5) -> dict[str, float]:
    """Error pixels by kind (boundary band or away) and the Dice left by fixing each kind."""
    n = {"tp": 0, "fp_band": 0, "fp_away": 0, "fn_band": 0, "fn_away": 0}
    for c in cases:
        pred, label, fov = c.probs >= threshold, c.label.astype(bool), c.fov.astype(bool)
        band = boundary_band(label)
        fp, fn = pred & ~label & fov, ~pred & label & fov
        n["tp"] += int(np.count_nonzero(pred & label & fov))
        n["fp_band"] += int(np.count_nonzero(fp & band))
        n["fp_away"] += int(np.count_nonzero(fp & ~band))
        n["fn_band"] += int(np.count_nonzero(fn & band))
        n["fn_away"] += int(np.count_nonzero(fn & ~band))
    tp = n["tp"]
    return {
        **{k: float(v) for k, v in n.items()},
        "dice": dice_of((tp, n["fp_band"] + n["fp_away"], n["fn_band"] + n["fn_away"])),
        "dice_without_band_errors": dice_of((tp, n["fp_away"], n["fn_away"])),
        "dice_without_away_errors": dice_of((tp, n["fp_band"], n["fn_band"])),
    }


def predict_cases(model: Path, prepared: Path, split: str, tta: str) -> list[Case]:
    """The split predicted as ``vesselseg segment`` predicts it, mapped to native size."""
    from vesselseg.prepared import PreparedDataset
    from vesselseg.preprocess.spec import to_native
    from vesselseg.segment import load_predictor, with_tta

    predictor = load_predictor(model, device="cpu", backend="torch")
    predict = with_tta(predictor, tta)
    ds = PreparedDataset(prepared)
    cases = []
    for id_ in sorted(ds.ids(split)):
        item = ds.load(id_)
        probs, label, fov = predict(item.image), item.label, item.fov
        native = ds.native(id_)
        if native is not None:  # resized by prepare: scored at its native size, as evaluate does
            label, fov = native
            probs = to_native(probs, label.shape)
        cases.append(Case(id_, probs, label, fov))
    return cases


def mean_cases(members: Sequence[Sequence[Case]]) -> list[Case]:
    """The ensemble: per image, the mean of the members' probabilities."""
    return [
        Case(group[0].id, np.mean([c.probs for c in group], axis=0), group[0].label, group[0].fov)
        for group in zip(*members, strict=True)
    ]


def report(cases: Sequence[Case], members: Sequence[tuple[str, Sequence[Case]]] = ()) -> None:
    """Print the four tables for ``cases`` (the ensemble's, when there are members)."""
    print("\n1. pooled Dice by threshold")
    print_table(["threshold", "Dice"], [[t, pooled(cases, lambda p, t=t: p >= t)] for t in THRESHOLDS], floatfmt=".4f")
    print("\n2. pooled Dice after removing predicted components smaller than N px (8-connected, threshold 0.5)")
    rows = [[m, pooled(cases, lambda p, m=m: remove_small(p >= 0.5, m))] for m in MIN_SIZES]
    print_table(["N", "Dice"], rows, floatfmt=".4f")
    a = anatomy(cases)
    print("\n3. error pixels at threshold 0.5: boundary band (one pixel too wide / too thin) or away from it")
    print_table(
        ["", "boundary band", "away", "Dice if fixed alone"],
        [
            ["false positives", int(a["fp_band"]), int(a["fp_away"]), ""],
            ["false negatives", int(a["fn_band"]), int(a["fn_away"]), ""],
            ["band errors fixed", "", "", a["dice_without_band_errors"]],
            ["away errors fixed", "", "", a["dice_without_away_errors"]],
            ["as predicted", "", "", a["dice"]],
        ],
        floatfmt=".4f",
    )
    if len(members) > 1:
        print("\n4. ensemble: each model alone and the mean of their probabilities (threshold 0.5)")
        rows = [[name, pooled(m, lambda p: p >= 0.5)] for name, m in members]
        rows.append(["mean of all", pooled(cases, lambda p: p >= 0.5)])
        print_table(["model", "Dice"], rows, floatfmt=".4f")


def main() -> int:
    from vesselseg.inference.tta import TTA_MODES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, action="append", required=True, help="a model file (repeat: an ensemble)")
    ap.add_argument("--prepared", type=Path, required=True, help="the prepared folder the model was trained on")
    ap.add_argument("--split", default="val", help="split to score (default: val)")
    ap.add_argument("--tta", default="none", choices=TTA_MODES, help="test-time augmentation (default: none)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    threads = int(os.environ.get("VESSELSEG_THREADS", "2"))
    torch.set_num_threads(threads)
    header(
        "error anatomy",
        models=", ".join(map(str, args.model)),
        data=f"{args.prepared}, split {args.split}",
        conditions=f"CPU, torch {torch.__version__}, {threads} thread(s), TTA {args.tta}, FOV-pooled, native size",
    )
    members = [(str(m), predict_cases(m, args.prepared, args.split, args.tta)) for m in args.model]
    if not members[0][1]:
        sys.exit(f"{args.prepared}: no images in split {args.split!r}")
    cases = mean_cases([m for _, m in members]) if len(members) > 1 else list(members[0][1])
    report(cases, members)
    return 0


if __name__ == "__main__":
    sys.exit(main())
