"""Turn a pipeline-trained model into a shipped pretrained model with its model card.

    python scripts/make_pretrained.py fundus --run DIR [--name-in-card "..."]

``DIR`` is a finished pipeline run (a project folder after ``dvc repro`` or ``dvc exp
run``): its ``models/model.pt``, ``params.yaml``, ``reports/metrics.json`` and
``reports/train/metrics.json``.  The model is copied to
``src/vesselseg/pretrained/<name>.pt`` (with the preprocessing spec its params imply
when the file predates the spec), and ``<name>.md`` is written from measured numbers
only: the pipeline's validation and test metrics, and for ``fundus`` the 20 DRIVE
test images through ``vesselseg segment`` with the official FOV masks (the line
``tests/test_segment.py::test_shipped_fundus_model_reaches_its_model_card_on_drive``
checks).  Nothing in a card is typed by hand.  The weights are an output, tracked by
DVC, not git: after building, ``dvc add src/vesselseg/pretrained/<name>.pt`` and
``dvc push`` (the card goes to git).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

DATA_TERMS = {
    "fundus": (
        "DRIVE (Staal et al., IEEE TMI 2004): 20 training images (17 train, 3 validation), 20 test images. "
        "Its terms allow research use and forbid redistribution of the images: this model is shipped, the "
        "images are not."
    ),
    "octa": (
        "OCTA-500 3M (Li et al., Medical Image Analysis 2024), 2D projection maps: official split, 140 train "
        "/ 10 validation. Research use; the images are not redistributed."
    ),
}


def _drive_segment_scores(model: Path, drive_test: Path) -> dict[str, float]:
    """Pooled FOV F1 and AUC of the 20 DRIVE test images through ``vesselseg segment``."""
    from PIL import Image
    from sklearn.metrics import roc_auc_score

    from vesselseg.models import read_model_file
    from vesselseg.segment import model_tta, run_segment

    images = sorted((drive_test / "images").glob("*_test.tif"))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.monotonic()
        run_segment(images, model=model, out_dir=Path(tmp), fov_dir=drive_test / "mask", backend="torch")
        seconds = (time.monotonic() - t0) / len(images)
        tp = fp = fn = 0
        ys, ps = [], []
        for img in images:
            n = img.stem.split("_")[0]
            pred = np.asarray(Image.open(Path(tmp) / f"{img.stem}_mask.png")) > 0
            probs = np.asarray(Image.open(Path(tmp) / f"{img.stem}_probs.png")).astype(np.float64) / 65535.0
            label = np.asarray(Image.open(drive_test / "1st_manual" / f"{n}_manual1.gif")) > 0
            fov = np.asarray(Image.open(drive_test / "mask" / f"{n}_test_mask.gif")) > 0
            tp += int((pred & label & fov).sum())
            fp += int((pred & ~label & fov).sum())
            fn += int((~pred & label & fov).sum())
            ys.append(label[fov])
            ps.append(probs[fov])
    return {
        "f1": 2 * tp / (2 * tp + fp + fn),
        "auc": float(roc_auc_score(np.concatenate(ys), np.concatenate(ps))),
        "seconds_per_image": seconds,
        "tta": model_tta(read_model_file(model)["extra"]["preprocessing"]),
        "n": len(images),
    }


def _carry_predict_settings(model_file: Path, params_file: Path) -> None:
    """Store the run's TTA and window in the shipped file's spec.

    The train stage records the preprocessing but not how the predict stage ran (it
    does not depend on ``predict``); the card's numbers come from that predict stage,
    so ``segment --model NAME`` must run the same way by default (``--tta model``).
    """
    from vesselseg.models import load_model, save_model
    from vesselseg.params import load_params
    from vesselseg.preprocess.spec import preprocessing_spec

    p = load_params(params_file)
    model, meta = load_model(model_file, map_location="cpu")
    extra = dict(meta.get("extra") or {})
    spec = dict(extra["preprocessing"])
    # the window as preprocessing_spec writes it (one home), from the run's predict section
    spec["window"] = preprocessing_spec(p.data, p.prepare, p.model, spec["threshold"], predict=p.predict)["window"]
    spec["tta"] = p.predict.tta
    extra["preprocessing"] = spec
    save_model(model_file, model, dict(meta["config"]), extra=extra)


def _fmt(value: object) -> str:
    """A metric as the card shows it: 4 decimals, or '-' where the run did not compute it."""
    return f"{value:.4f}" if isinstance(value, int | float) else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=sorted(DATA_TERMS))
    ap.add_argument("--run", type=Path, required=True, help="a finished pipeline run (project folder)")
    ap.add_argument("--reproduce", required=True, help="the command that reproduces the run (goes in the card)")
    ap.add_argument("--drive", type=Path, default=ROOT.parent / "shared" / "datasets" / "DRIVE")
    ap.add_argument("--conditions", default="", help="machine and load during training (goes beside the time)")
    ap.add_argument("--note", default="", help="a sentence for the card (e.g. a target not met)")
    args = ap.parse_args()

    from vesselseg.models import read_model_file
    from vesselseg.segment import upgrade_model

    dest = ROOT / "src" / "vesselseg" / "pretrained" / f"{args.name}.pt"
    src = args.run / "models" / "model.pt"
    if (read_model_file(src).get("extra") or {}).get("preprocessing") is None:
        upgrade_model(src, args.run / "params.yaml", dest)
    else:
        shutil.copyfile(src, dest)
    params = yaml.safe_load((args.run / "params.yaml").read_text())
    _carry_predict_settings(dest, args.run / "params.yaml")
    metrics = json.loads((args.run / "reports" / "metrics.json").read_text())
    train = json.loads((args.run / "reports" / "train" / "metrics.json").read_text())
    lines = [
        f"# `{args.name}`: vesselseg pretrained model",
        "",
        f"- file: `src/vesselseg/pretrained/{args.name}.pt` ({dest.stat().st_size / 1e6:.1f} MB), "
        f"`vesselseg segment IMAGES --model {args.name}`",
        f"- training data: {DATA_TERMS[args.name]}",
        f"- model: `{params['model']['name']}`, {train.get('n_params')} parameters; best epoch "
        f"{train.get('best_epoch')} of {train.get('epochs_run')} (picked on validation images only), "
        f"{train.get('train_seconds')} s of training" + (f" ({args.conditions})" if args.conditions else ""),
        f"- reproduce: `{args.reproduce}`",
        *([f"- note: {args.note}"] if args.note else []),
        "",
        "## Pipeline metrics (FOV pooled, threshold 0.5)",
        "",
        "| split | Dice/F1 | AUC | clDice | sensitivity | specificity |",
        "|---|---|---|---|---|---|",
    ]
    for split, v in metrics.items():
        if isinstance(v, dict) and "dice" in v:
            cells = [_fmt(v.get(k)) for k in ("dice", "auc_roc", "cldice", "sensitivity", "specificity")]
            lines.append(f"| {split} | " + " | ".join(cells) + " |")
    if args.name == "fundus":
        s = _drive_segment_scores(dest, args.drive / "test")
        drive_shown = os.path.relpath(args.drive, ROOT)
        lines += [
            "",
            "## Through `vesselseg segment` (the shipped file, official FOV masks)",
            "",
            f"DRIVE test F1 (FOV pooled, segment): {s['f1']:.4f}",
            "",
            f"DRIVE test AUC (FOV pooled, segment): {s['auc']:.4f}; {s['n']} images, TTA {s['tta']} (the model's), "
            f"{s['seconds_per_image']:.2f} s per image on the CPU ({time.strftime('%Y-%m-%d')}).",
            "",
            f"Command: `vesselseg segment {drive_shown}/test/images --fov {drive_shown}/test/mask "
            f"--model fundus --out OUT`",
        ]
    lines += [
        "",
        "## Recipe (params.yaml of the run)",
        "",
        "```yaml",
        yaml.safe_dump(
            {k: params[k] for k in ("prepare", "patches", "model", "train", "predict") if k in params}, sort_keys=False
        ).rstrip(),
        "```",
        "",
    ]
    dest.with_suffix(".md").write_text("\n".join(lines))
    print(dest.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
