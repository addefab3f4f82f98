"""DRIVE -> STARE (and any other fundus set), with and without resolution harmonisation.

Prepares each target dataset twice with the *model's own* preprocessing (read from
the model file's spec: channel, equalization, gamma): once at its native resolution
and once rescaled so that its FOV diameter equals the training set's
(``prepare.fov_diameter``, the median FOV diameter of the training images), then
runs ``vesselseg crossdataset`` through the library (:func:`vesselseg.crossdataset.
run_crossdataset`).  Harmonised cells are scored at native resolution (predictions
mapped back), so both variants are scored on the same pixels.

    python benchmarks/crossdataset.py --model drive=/path/fundus.pt \\
        --train-set drive=../shared/datasets/DRIVE --target stare=../shared/datasets/STARE \\
        --out reports/crossdataset

The training set is scored on its test split; a target on all its images (no model
saw them).  Writes ``OUT.csv``/``OUT.md`` and prints the table.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vesselseg.inference.tta import TTA_MODES  # noqa: E402
from vesselseg.params import DataParams, PredictParams, PrepareParams  # noqa: E402


def _prepare(name: str, source: Path, work: Path, spec: dict, fov_diameter: int | None) -> Path:
    from vesselseg.data.adapters import get_adapter
    from vesselseg.prepare import run_prepare

    raw = work / f"{name}-raw"
    data = DataParams(dataset=name, source=str(source))
    if not raw.is_dir():
        get_adapter(name).materialize(raw, source=source, params=data)
    eq = spec["equalize"]
    prepare = PrepareParams(
        slab=None,
        channel=spec["channel"],
        equalize=eq["method"],
        clahe_clip=eq["clahe_clip"],
        clahe_tile=eq["clahe_tile"],
        gamma=spec["gamma"],
        fov_diameter=fov_diameter,
    )
    out = work / (f"{name}-fov{fov_diameter}" if fov_diameter else f"{name}-native")
    run_prepare(raw_dir=raw, out_dir=out, data=data, prepare=prepare)
    return out


def _median_fov_diameter(prepared: Path) -> int:
    from vesselseg.prepared import SPLITS, PreparedDataset
    from vesselseg.preprocess.spec import fov_diameter

    ds = PreparedDataset(prepared)
    return int(np.median([fov_diameter(ds.load(i).fov) for s in SPLITS for i in ds.ids(s)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="NAME=MODEL.pt (a fundus model with a preprocessing spec)")
    ap.add_argument("--train-set", required=True, help="NAME=SOURCE of the dataset the model was trained on")
    ap.add_argument("--target", action="append", required=True, help="NAME=SOURCE of a dataset to score on")
    ap.add_argument("--work", type=Path, default=Path("/tmp/vesselseg-crossdataset"))
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "crossdataset")
    ap.add_argument(
        "--tta",
        choices=("model", *TTA_MODES),
        default="model",
        help="test-time augmentation; 'model': what the model file names (the shipped models: their recipe's)",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    from vesselseg.crossdataset import run_crossdataset
    from vesselseg.models import read_model_file

    m_name, _, m_path = args.model.partition("=")
    spec = (read_model_file(m_path)["extra"] or {}).get("preprocessing")
    if spec is None:
        sys.exit(f"{m_path}: no preprocessing spec; re-save it with `vesselseg upgrade-model`")
    from vesselseg.segment import model_tta

    tta = model_tta(spec) if args.tta == "model" else args.tta
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    tr_name, _, tr_src = args.train_set.partition("=")
    train_prepared = _prepare(tr_name, Path(tr_src).resolve(), args.work, spec, None)
    diameter = _median_fov_diameter(train_prepared)
    datasets = {tr_name: train_prepared}
    splits = {tr_name: "test"}
    for target in args.target:
        name, _, src = target.partition("=")
        datasets[f"{name} (native)"] = _prepare(name, Path(src).resolve(), args.work, spec, None)
        datasets[f"{name} (FOV {diameter} px)"] = _prepare(name, Path(src).resolve(), args.work, spec, diameter)
        splits[f"{name} (native)"] = splits[f"{name} (FOV {diameter} px)"] = "all"
    cells = run_crossdataset(
        models={m_name: Path(m_path)},
        datasets=datasets,
        out=args.out,
        predict=PredictParams(window=None, tta=tta),
        splits=splits,
        device="cpu",
        amp=False,
    )
    print(args.out.with_suffix(".md").read_text())
    print(
        f"{len(cells)} cells in {time.monotonic() - t0:.0f} s on {time.strftime('%Y-%m-%d')}; training-set median "
        f"FOV diameter {diameter} px; TTA {tta}"
    )


if __name__ == "__main__":
    main()
