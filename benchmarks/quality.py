"""Quality on real data: the default recipe on DRIVE and OCTA-500, on this machine.

Runs ``dvc repro`` of a dataset config (``configs/<name>.yaml`` over params.yaml) in a
scratch copy of the project, and prints one table: dataset, split, metric, value,
published anchor, wall time.  Model and threshold are chosen on validation images
only; the test split is only predicted and scored.

    python benchmarks/quality.py drive octa500-3m [--minutes 22] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))  # tools/ (test and benchmark support)

from tools import scratch  # noqa: E402

# (split, metric) -> (floor, goal, anchor text), from the quality issue
ANCHORS = {
    "drive": {
        ("test", "auc_roc"): (0.975, 0.982, "U-Net 0.9807 (VesselSeg-Pytorch)"),
        ("test", "dice"): (0.80, 0.83, "U-Net F1 0.8263; 2nd observer 0.788; W-Net ~0.82"),
    },
    "octa500-3m": {
        ("val", "dice"): (0.88, 0.90, "OCTA-500 3M validation Dice goal 0.90"),
    },
}


def run_one(name: str, minutes: float | None, workdir: Path) -> list[dict[str, object]]:
    overlay = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    source = overlay.get("data", {}).get("source")
    if source and not os.path.isabs(source):
        overlay["data"]["source"] = str((ROOT / source).resolve())
    if not Path(overlay["data"]["source"]).exists():
        print(f"SKIP {name}: {overlay['data']['source']} not found")
        return []
    if minutes is not None:
        overlay.setdefault("train", {})["max_minutes"] = minutes
    env = scratch.scratch_env()
    project = scratch.make_project(workdir / name, overlay, root=ROOT, env=env)
    t0 = time.monotonic()
    out = scratch.run(["dvc", "repro"], project, env)
    wall = time.monotonic() - t0
    (workdir / f"{name}.log").write_text(out)
    stages = {m[0]: float(m[1]) for m in re.findall(r"stage (\w+) finished in ([\d.]+) s", out)}
    metrics = json.loads((project / "reports/metrics.json").read_text())
    train = json.loads((project / "reports/train/metrics.json").read_text())
    rows = []
    for split, values in metrics.items():
        for metric in ("dice", "auc_roc", "sensitivity", "specificity", "accuracy"):
            if metric not in values:
                continue
            floor, goal, anchor = ANCHORS.get(name, {}).get((split, metric), (None, None, ""))
            verdict = "" if floor is None else ("GOAL" if values[metric] >= goal else
                                                 "PASS" if values[metric] >= floor else "FAIL")
            rows.append({"dataset": name, "split": split, "metric": metric, "value": values[metric],
                         "floor": floor, "anchor": anchor, "verdict": verdict, "wall_s": round(wall)})
    print(f"\n{name}: stages {stages}; training {train.get('epochs_run')} epochs, best epoch "
          f"{train.get('best_epoch')}, {train.get('train_seconds')} s; total wall {wall:.0f} s")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", default=["drive", "octa500-3m"])
    ap.add_argument("--minutes", type=float, default=None, help="override train.max_minutes")
    ap.add_argument("--keep", type=Path, default=Path("/tmp/vesselseg-quality"), help="scratch folder")
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    rows = []
    for name in args.names:
        rows += run_one(name, args.minutes, args.keep)
    print("\n| dataset | split | metric | value | floor | anchor | verdict | wall (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dataset']} | {r['split']} | {r['metric']} | {r['value']:.4f} | {r['floor'] or ''} | "
              f"{r['anchor']} | {r['verdict']} | {r['wall_s']} |")
    verdicts = [r["verdict"] for r in rows if r["verdict"]]
    print("\nverdict:", "FAIL" if "FAIL" in verdicts or not verdicts else "PASS")


if __name__ == "__main__":
    main()
