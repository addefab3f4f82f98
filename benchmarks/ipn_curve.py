"""Proof that the IPN trains: its learning curve on a small synthetic OCTA set, on the CPU.

Runs the pipeline's own functions end to end: generate synthetic OCTA volumes
(``vesselseg.data.synthetic_octa``), prepare them with ``prepare.volumes: true``,
train with the IPN family (:mod:`vesselseg.families.ipn`) under a wall-clock cap, predict
the validation and test volumes with :func:`vesselseg.inference.predict.run_predict`,
and print the history table (train loss should fall and
validation Dice rise) and the FOV-pooled test Dice.

    python benchmarks/ipn_curve.py --minutes 4 --out /tmp/ipn_curve

``--slab none`` keeps the full depth in the volumes (and projections), so the
network must learn to ignore the unlabelled deep plexus below the vessel slab,
which is the harder task the IPN exists for.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--subjects", type=int, default=12)
    ap.add_argument("--bscans", type=int, default=64)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--depth", type=int, default=160, help="rows per synthetic B-scan")
    ap.add_argument("--slab", default="60,100", help="'start,stop' depth rows kept, or 'none' for the full depth")
    ap.add_argument("--volume-depth", type=int, default=32)
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--n-blocks", type=int, default=3)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--minutes", type=float, default=4.0, help="wall-clock cap on training")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")

    from vesselseg.data.adapters import mark_raw
    from vesselseg.data.synthetic_octa import generate_octa_dataset
    from vesselseg.families.base import TrainJob
    from vesselseg.families.ipn import IpnFamily
    from vesselseg.inference.predict import run_predict
    from vesselseg.metrics import confusion, scores_from_confusion
    from vesselseg.params import DataParams, ModelParams, Params, PredictParams, PrepareParams, TrainParams
    from vesselseg.prepare import run_prepare
    from vesselseg.prepared import PreparedDataset

    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="ipn_curve-"))
    slab = None if args.slab.lower() == "none" else tuple(int(v) for v in args.slab.split(","))
    synth_slab = slab or (60, 100)

    t0 = time.monotonic()
    generate_octa_dataset(
        out / "raw",
        n_subjects=args.subjects,
        n_bscans=args.bscans,
        depth=args.depth,
        width=args.width,
        slab=synth_slab,
        seed=args.seed,
        progress=False,
    )
    mark_raw(out / "raw", "synthetic")
    prepare = PrepareParams(slab=slab, volumes=True, volume_depth=args.volume_depth)
    run_prepare(
        raw_dir=out / "raw",
        out_dir=out / "prepared",
        data=DataParams(dataset="synthetic", seed=args.seed),
        prepare=prepare,
    )
    t_data = time.monotonic() - t0

    model = ModelParams(name="ipn", ipn={"channels": args.channels, "n_blocks": args.n_blocks, "block": args.block})
    train = TrainParams(
        lr=args.lr,
        epochs=args.epochs,
        batch_size=args.batch,
        loss="bce+dice",
        patience=args.epochs,
        threads=args.threads,
        device="cpu",
        max_minutes=args.minutes,
    )
    params = Params(seed=args.seed, model=model, train=train, prepare=prepare)
    metrics = IpnFamily().fit(
        TrainJob(
            params=params,
            prepared_dir=out / "prepared",
            model_path=out / "model.pt",
            checkpoint_path=out / "checkpoint.pt",
            history_path=out / "history.csv",
            metrics_path=out / "train_metrics.json",
            model_extra={"recipe": "ipn-curve"},
        )
    )
    run_predict(
        model_path=out / "model.pt",
        prepared_dir=out / "prepared",
        out_dir=out / "predictions",
        device="cpu",
        amp=False,
        predict=PredictParams(window=args.block, overlap=0.5, weighting="gaussian", batch_size=args.batch),
    )
    ds = PreparedDataset(out / "prepared")
    c = np.zeros(4, dtype=np.int64)
    for id_ in ds.ids("test"):
        item = ds.load(id_)
        probs = np.load(out / "predictions" / "test" / "probs" / f"{id_}.npy")
        c += np.array(confusion(probs >= 0.5, item.label, item.fov))
    test = scores_from_confusion(*(int(v) for v in c))

    hist = pd.read_csv(out / "history.csv")
    print(
        f"\nIPN learning curve ({args.subjects} synthetic subjects, volumes {args.volume_depth}x{args.width}x"
        f"{args.bscans}, slab {slab}, channels {args.channels}, block {args.block}, batch {args.batch}, "
        f"{args.threads} threads; data {t_data:.0f} s)"
    )
    print(hist.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(
        f"best epoch {metrics['best_epoch']}  best val Dice {metrics['best_val_dice']:.4f}  "
        f"train {metrics['train_seconds']:.0f} s  params {metrics['n_params']}"
    )
    print(
        f"test ({len(ds.ids('test'))} volumes, FOV pooled, threshold 0.5): dice {test['dice']:.4f}  "
        f"iou {test['iou']:.4f}"
    )
    print(f"outputs in {out}")


if __name__ == "__main__":
    main()
