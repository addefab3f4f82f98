"""Cross-dataset results: every trained model on every prepared dataset, one table.

A model trained on one camera is scored on the images of another: the question a
user of a public model asks first.  The command takes model files and prepared
datasets (``data/prepared`` of any pipeline run, bring-your-own ones included: a
user's CHASE_DB1 or HRF copy prepared by their own ``dvc repro``), predicts each
dataset's images through the one prediction writer
(:func:`vesselseg.inference.predict.run_predict`, the family read from the model
file), and scores them inside the FOV at threshold ``predict.threshold``: FOV-pooled
F1 (Dice) and AUC, and clDice (:mod:`vesselseg.topology`).

Resolution: a dataset prepared with ``prepare.fov_diameter`` (or ``prepare.scale``)
keeps its native labels (``native/labels``, ``native/fov``) and their sizes
(``native_sizes.json``); the probability maps are then mapped back to the native
size and scored there, the published protocol, so harmonised and native cells are
scored on the same pixels.

Outputs: ``<out>.csv`` (one row per cell) and ``<out>.md`` (a dataset x dataset table
per metric, and under it the command that reproduces each cell).
"""

from __future__ import annotations

import logging
import shlex
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vesselseg import atomic
from vesselseg.errors import DataError
from vesselseg.params import PredictParams
from vesselseg.prepared import SPLITS, PreparedDataset

log = logging.getLogger(__name__)

__all__ = ["Cell", "parse_named", "run_crossdataset", "score_predictions"]


@dataclass(frozen=True)
class Cell:
    model: str
    dataset: str
    split: str
    n_images: int
    f1: float
    auc: float | None
    cldice: float
    seconds: float
    native: bool


def parse_named(values: Sequence[str], what: str) -> dict[str, Path]:
    """``NAME=PATH`` pairs (a bare PATH is named by its parent folder) -> {name: path}, checked to exist."""
    out: dict[str, Path] = {}
    for v in values:
        name, sep, path = v.partition("=")
        p = Path(path if sep else name).expanduser()
        if not sep:
            name = p.parent.name if p.name in ("prepared", "model.pt") else p.stem
        if not p.exists():
            raise DataError(f"{p}: {what} not found")
        if name in out:
            raise DataError(f"{what} name {name!r} given twice ({out[name]} and {p}); name them NAME=PATH")
        out[name] = p
    return out


def _split_ids(dataset: PreparedDataset, split: str) -> list[str]:
    if split == "all":
        return [i for s in SPLITS for i in dataset.ids(s)]
    return dataset.ids(split)


def score_predictions(
    dataset: PreparedDataset, ids: Sequence[str], probs_dir: Path, threshold: float
) -> dict[str, Any]:
    """FOV-pooled F1/AUC and pooled clDice of ``probs_dir/<id>.npy`` against the labels (native where kept)."""
    from vesselseg.metrics import MetricAccumulator, scores_from_confusion
    from vesselseg.preprocess.spec import to_native
    from vesselseg.topology import TopologyAccumulator

    acc = MetricAccumulator(threshold=threshold)
    topo = TopologyAccumulator()
    native_any = False
    for id_ in ids:
        probs = np.load(probs_dir / f"{id_}.npy")
        item = dataset.load(id_)
        label, fov = item.label, item.fov
        native = dataset.native(id_)
        if native is not None:
            label, fov = native
            probs = to_native(probs, label.shape)
            native_any = True
        acc.update(probs, label, fov)
        topo.update(probs >= threshold, label, fov)
    s = scores_from_confusion(*acc.confusion())
    return {
        "f1": float(s["dice"]),
        "auc": acc.result().get("auc_roc"),
        "cldice": float(topo.result()["cldice"]),
        "native": native_any,
    }


def run_crossdataset(
    *,
    models: dict[str, Path],
    datasets: dict[str, Path],
    out: Path,
    predict: PredictParams,
    split: str = "test",
    splits: dict[str, str] | None = None,
    device: str = "auto",
    amp: bool = True,
    command: str = "vesselseg crossdataset",
) -> list[Cell]:
    """Score every model on every dataset's ``split`` (``all`` for every image); write ``out``.csv/.md.

    ``splits`` overrides the split per dataset name: a dataset no model was trained on
    is scored on all its images, the training dataset on its test split only.
    """
    from vesselseg.inference.predict import run_predict

    chosen = {name: (splits or {}).get(name, split) for name in datasets}
    unknown = sorted(set(splits or {}) - set(datasets))
    if unknown:
        raise DataError(f"--split: no dataset named {unknown[0]!r} (datasets: {', '.join(datasets)})")
    for s in chosen.values():
        if s not in (*SPLITS, "all"):
            raise DataError(f"--split: unknown split {s!r} (one of {', '.join((*SPLITS, 'all'))})")
    prepared = {name: PreparedDataset(path) for name, path in datasets.items()}
    for name, ds in prepared.items():
        if not _split_ids(ds, chosen[name]):
            raise DataError(f"{ds.root}/split.json: dataset {name!r} has no {chosen[name]!r} images")
    cells: list[Cell] = []
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-crossdataset-", dir=Path(out).parent) as tmp:
        for m_name, m_path in models.items():
            for d_name, ds in prepared.items():
                ids = _split_ids(ds, chosen[d_name])
                pred_splits = SPLITS if chosen[d_name] == "all" else (chosen[d_name],)
                pred_dir = Path(tmp) / f"{m_name}--{d_name}"
                t0 = time.perf_counter()
                stats = run_predict(
                    model_path=m_path,
                    prepared_dir=ds.root,
                    out_dir=pred_dir,
                    predict=predict,
                    device=device,
                    amp=amp,
                    splits=pred_splits,
                )
                seconds = time.perf_counter() - t0
                probs_dir = Path(tmp) / f"{m_name}--{d_name}-all"
                probs_dir.mkdir()
                for s in pred_splits:
                    for f in (pred_dir / s / "probs").glob("*.npy"):
                        f.rename(probs_dir / f.name)
                score = score_predictions(ds, ids, probs_dir, predict.threshold)
                cells.append(
                    Cell(
                        m_name,
                        d_name,
                        chosen[d_name],
                        len(ids),
                        score["f1"],
                        score["auc"],
                        score["cldice"],
                        seconds / max(stats["n_images"], 1),
                        score["native"],
                    )
                )
                log.info(
                    "%s on %s: F1 %.4f, AUC %s, clDice %.4f (%d images)",
                    m_name,
                    d_name,
                    score["f1"],
                    f"{score['auc']:.4f}" if score["auc"] is not None else "-",
                    score["cldice"],
                    len(ids),
                )
    write_tables(cells, out, models=models, datasets=datasets, command=command)
    return cells


def write_tables(
    cells: Sequence[Cell], out: Path, *, models: dict[str, Path], datasets: dict[str, Path], command: str
) -> None:
    df = pd.DataFrame([c.__dict__ for c in cells])
    atomic.write_text(Path(out).with_suffix(".csv"), df.to_csv(index=False, float_format="%.4f"))
    scored = ", ".join(
        f"{d}: {s} ({n} images)"
        for d, s, n in df[["dataset", "split", "n_images"]].drop_duplicates().itertuples(index=False)
    )
    lines = [
        f"Cross-dataset results (rows: trained on, columns: scored on; {scored}; FOV-pooled at "
        "predict.threshold; scored at native resolution where the dataset was resized).",
        "",
    ]
    for metric, label in (("f1", "F1 (Dice)"), ("auc", "AUC"), ("cldice", "clDice")):
        piv = df.pivot(index="model", columns="dataset", values=metric).reindex(
            index=list(models), columns=list(datasets)
        )
        lines += [
            f"**{label}**",
            "",
            "| trained on \\ scored on | " + " | ".join(piv.columns) + " |",
            "|---|" + "---|" * len(piv.columns),
        ]
        for m, row in piv.iterrows():
            lines.append(f"| {m} | " + " | ".join("-" if pd.isna(v) else f"{v:.4f}" for v in row) + " |")
        lines.append("")
    lines += ["Each cell reproduces with:", ""]
    for c in cells:
        cmd = (
            f"{command} --model {shlex.quote(f'{c.model}={models[c.model]}')} "
            f"--dataset {shlex.quote(f'{c.dataset}={datasets[c.dataset]}')} --split {c.split}"
        )
        lines.append(f"- {c.model} -> {c.dataset}: `{cmd}`")
    atomic.write_text(Path(out).with_suffix(".md"), "\n".join(lines) + "\n")
