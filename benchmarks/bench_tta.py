"""Test-time augmentation on DRIVE: quality gain and cost per image of none / flips / d4.

Each test image is predicted whole in one pass (``predict_image`` with no window,
the DRIVE config's setting) and wrapped in
:func:`vesselseg.inference.tta.predict_with_tta`; the three modes run one after the
other on each image (interleaved, so load drift on a shared machine hits all of
them alike).  Scores are pooled over the FOV pixels of the split at threshold 0.5
(:class:`vesselseg.metrics.MetricAccumulator`, the evaluate stage's rule), plus the
pooled clDice (:mod:`vesselseg.topology`).  Seconds per image cover the prediction
only (no file reading).  The table prints F1, AUC, clDice, their gains over
``none`` and the time ratio.

Usage::

    python benchmarks/bench_tta.py --model models/model.pt --prepared data/prepared
    python benchmarks/bench_tta.py --model M.pt          # prepares DRIVE from conf/dataset/drive.yaml first

Without ``--prepared`` the DRIVE copy named by ``conf/dataset/drive.yaml`` (data.source,
default ``../shared/datasets/DRIVE``) is prepared into a scratch folder with that
config's prepare settings, which must be the ones the model was trained with.
``VESSELSEG_THREADS`` (default 2) sets the torch threads.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import header, print_table  # noqa: E402

from vesselseg.device import to_channels_last  # noqa: E402
from vesselseg.inference.predict import predict_image  # noqa: E402
from vesselseg.inference.tta import TTA_MODES, predict_with_tta, transforms  # noqa: E402
from vesselseg.metrics import MetricAccumulator  # noqa: E402
from vesselseg.models import load_model  # noqa: E402
from vesselseg.prepared import PreparedDataset  # noqa: E402
from vesselseg.topology import TopologyAccumulator  # noqa: E402


def prepare_drive(workdir: Path, dataset: str) -> Path:
    """Download (copy) and prepare DRIVE as ``dvc exp run -S dataset=<dataset>`` composes it; the prepared folder."""
    from vesselseg.cli import main as vesselseg
    from vesselseg.recipes import compose

    params = compose([f"dataset={dataset}"], root=ROOT)
    source = Path(params["data"]["source"])
    if not source.is_absolute():
        source = (ROOT / source).resolve()
    if not source.exists():
        sys.exit(f"SKIP: {source} not found (DRIVE is bring-your-own; see conf/dataset/{dataset}.yaml)")
    params["data"]["source"] = str(source)
    params_path = workdir / "params.yaml"
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    for stage, args in (
        ("download", ["--out", str(workdir / "raw")]),
        ("prepare", ["--raw", str(workdir / "raw"), "--out", str(workdir / "prepared")]),
    ):
        try:
            vesselseg(["--params", str(params_path), stage, *args])
        except SystemExit as err:  # the CLI exits 0 on success too
            if err.code:
                raise
    return workdir / "prepared"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="a trained DRIVE model (models/model.pt)")
    ap.add_argument("--prepared", type=Path, default=None, help="prepared DRIVE folder (default: prepare it)")
    ap.add_argument("--dataset", default="drive", help="conf/dataset/<name>.yaml to prepare (default: drive)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--modes", nargs="+", default=list(TTA_MODES), choices=TTA_MODES)
    ap.add_argument("--limit", type=int, default=None, help="first N images only (a quick look)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    threads = int(os.environ.get("VESSELSEG_THREADS", "2"))
    torch.set_num_threads(threads)

    with tempfile.TemporaryDirectory(prefix="bench-tta-") as tmp:
        prepared = args.prepared or prepare_drive(Path(tmp), args.dataset)
        ds = PreparedDataset(prepared)
        ids = sorted(ds.ids(args.split))[: args.limit]
        if not ids:
            sys.exit(f"{prepared}: no images in split {args.split!r}")
        model, meta = load_model(args.model, map_location="cpu")
        channels_last = to_channels_last(model)
        model.eval()
        header(
            "test-time augmentation (whole image per pass)",
            model=f"{args.model} ({sum(p.numel() for p in model.parameters())} params, {meta.get('config')})",
            data=f"{prepared}, split {args.split}, {len(ids)} images",
            conditions=f"CPU, torch {torch.__version__}, {threads} thread(s), whole image per pass, "
            f"channels_last {channels_last}, float32, threshold 0.5, FOV-pooled",
        )

        def predict(x: np.ndarray) -> np.ndarray:
            return predict_image(
                model,
                x,
                window=None,
                overlap=0.0,
                weighting="constant",
                batch_size=1,
                device="cpu",
                amp=False,
                channels_last=channels_last,
            )

        predict(ds.load(ids[0]).image)  # warm-up: first-call allocations are not TTA's cost
        accs = {m: MetricAccumulator(threshold=0.5) for m in args.modes}
        topo = {m: TopologyAccumulator() for m in args.modes}
        seconds: dict[str, list[float]] = {m: [] for m in args.modes}
        for id_ in ids:
            item = ds.load(id_)
            for mode in args.modes:
                t0 = time.perf_counter()
                probs = predict_with_tta(predict, item.image, mode)
                seconds[mode].append(time.perf_counter() - t0)
                accs[mode].update(probs, item.label, item.fov)
                topo[mode].update(probs >= 0.5, item.label, item.fov)
            print(f"  {id_}: " + "  ".join(f"{m} {seconds[m][-1]:.2f} s" for m in args.modes), flush=True)

    base = args.modes[0]
    ref = accs[base].result()
    ref_cl = topo[base].result()["cldice"]
    ref_s = statistics.median(seconds[base])
    rows = []
    for mode in args.modes:
        res, cl = accs[mode].result(), topo[mode].result()["cldice"]
        med = statistics.median(seconds[mode])
        rows.append(
            [
                mode,
                len(transforms(mode)),
                res["dice"],
                res["auc_roc"],
                cl,
                f"{res['dice'] - ref['dice']:+.4f}",
                f"{res['auc_roc'] - ref['auc_roc']:+.4f}",
                f"{cl - ref_cl:+.4f}",
                med,
                f"{med / ref_s:.2f}x",
            ]
        )
    print()
    print_table(
        [
            "mode",
            "passes",
            "F1",
            "AUC",
            "clDice",
            f"dF1 vs {base}",
            f"dAUC vs {base}",
            f"dclDice vs {base}",
            "s/image (median)",
            f"time / {base}",
        ],
        rows,
        floatfmt=".4f",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
