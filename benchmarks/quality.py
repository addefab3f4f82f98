"""Quality on real data: each dataset config run the way a user runs it, on this machine.

For each dataset name (a ``conf/dataset/<name>.yaml``) this makes a fresh scratch copy
of the project and runs, in it, exactly ``dvc exp run -S dataset=<name> [-S ...]``:
the same Hydra composition as a user's clone, no private overlay.  It then prints one
table per run: split, F1 (Dice), AUC-ROC, sensitivity / specificity / accuracy and,
when ``reports/metrics.json`` has them, clDice and the Betti-0/Betti-1 errors, next to
the published anchors, with the wall time of the whole ``dvc exp run``.  Model and
threshold are chosen on validation images only; the test split is only predicted and
scored.  ``--write-readme`` rewrites the marked block of README.md from these rows, so
no number there is typed by hand (rows of datasets not run now are kept).

    python benchmarks/quality.py drive octa500-3m stare chase_db1 [-S train.max_minutes=20]
    python benchmarks/quality.py drive --write-readme
    python benchmarks/quality.py --readme-from drive.log    # the saved output of a run

Relative ``data.source`` paths (``../shared/datasets/DRIVE``) resolve as in a clone:
the scratch project sits beside a link ``shared -> <this checkout>/../shared``.  A
rerun replaces the previous scratch copy of the same dataset.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))  # tools/ (test and benchmark support)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import load_text  # noqa: E402

from tools import scratch  # noqa: E402
from vesselseg.errors import VesselsegError  # noqa: E402
from vesselseg.recipes import check_source, compose  # noqa: E402

BEGIN, END = "<!-- quality:begin (benchmarks/quality.py --write-readme) -->", "<!-- quality:end -->"
LABELS = {
    "drive": "DRIVE",
    "octa500-3m": "OCTA-500 3M",
    "octa500-6m": "OCTA-500 6M",
    "stare": "STARE",
    "chase_db1": "CHASE_DB1",
    "hrf": "HRF",
}
# (dataset, metric) -> (floor, goal or None, anchor text): the floors and goals of the
# state-of-the-art issue (15; OCTA has a floor only), next to published numbers
ANCHORS: dict[tuple[str, str], tuple[float, float | None, str]] = {
    ("drive", "auc_roc"): (0.980, 0.985, "U-Net 0.9807 (VesselSeg-Pytorch)"),
    ("drive", "dice"): (0.825, 0.835, "U-Net F1 0.8263; 2nd observer 0.788; W-Net ~0.82"),
    ("octa500-3m", "dice"): (0.925, None, "best published OCTA-500 3M test Dice ~0.915"),
}
# (metrics.json key, label); the topology keys exist once evaluate computes them
METRICS = (
    ("dice", "F1 (Dice)"),
    ("auc_roc", "AUC-ROC"),
    ("cldice", "clDice"),
    ("betti0_error", "Betti-0 error"),
    ("betti1_error", "Betti-1 error"),
)


@dataclass
class Row:
    dataset: str
    split: str
    metric: str
    value: str
    target: str = ""
    anchor: str = ""
    verdict: str = ""
    wall: str = ""

    def cells(self) -> list[str]:
        return [self.dataset, self.split, self.metric, self.value, self.target, self.anchor, self.verdict, self.wall]


HEADER = ["dataset", "split", "metric", "value", "floor / goal", "anchor", "verdict", "wall"]


def rows_for(name: str, metrics: dict, wall_s: float, n_images: dict[str, int]) -> list[Row]:
    """Table rows of one run: the test split when the dataset has one, else validation."""
    split = "test" if "test" in metrics else "val"
    values = metrics[split]
    label, where = LABELS.get(name, name), f"{split} ({n_images.get(split, '?')})"
    rows: list[Row] = []
    for key, text in METRICS:
        if key not in values or values[key] is None:
            continue
        floor, goal, anchor = ANCHORS.get((name, key), (None, None, ""))
        verdict, target = "", ""
        if floor is not None:
            reached_goal = goal is not None and values[key] >= goal
            verdict = "GOAL" if reached_goal else "PASS" if values[key] >= floor else "FAIL"
            target = f"{floor}" if goal is None else f"{floor} / {goal}"
        rows.append(Row(label, where, text, f"{values[key]:.4f}", target, anchor, verdict))
    extra = [values.get(k) for k in ("sensitivity", "specificity", "accuracy")]
    if all(isinstance(v, (int, float)) for v in extra):
        rows.append(Row(label, where, "sensitivity / specificity / accuracy", " / ".join(f"{v:.3f}" for v in extra)))
    if rows:
        rows[0].wall = f"{wall_s / 60:.1f} min"
    return rows


def markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


def rewrite_readme(readme: Path, rows: list[Row], notes: list[str]) -> None:
    """Replace the marked block: rows of the datasets run now, earlier rows of the others kept."""
    text = readme.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme}: no block marked {BEGIN!r} ... {END!r}")
    head, rest = text.split(BEGIN, 1)
    block, tail = rest.split(END, 1)
    now = {r.dataset for r in rows}
    kept = [
        ln
        for ln in block.splitlines()
        if ln.startswith("| ") and not ln.startswith("| dataset |") and ln.split("|")[1].strip() not in now
    ]
    kept_rows = [Row(*[c.strip() for c in ln.strip().strip("|").split("|")]) for ln in kept]
    old_notes = [
        ln for ln in block.splitlines() if ln.startswith("- ") and not any(ln.startswith(f"- {d}:") for d in now)
    ]
    new = f"{BEGIN}\n{markdown(kept_rows + rows)}\n\n" + "\n".join([*old_notes, *notes]) + f"\n{END}"
    readme.write_text(head + new + tail, encoding="utf-8")


def parse_output(text: str) -> tuple[list[Row], list[str]]:
    """The rows and notes a finished run printed (its saved stdout), for ``--readme-from``.

    A 30-minute run should not be repeated because ``--write-readme`` was forgotten:
    the printed table is the run's output, so the README block can be written from it.
    """
    rows = [
        Row(*[c.strip() for c in ln.strip().strip("|").split("|")])
        for ln in text.splitlines()
        if ln.startswith("| ") and not ln.startswith("| dataset |")
    ]
    labels = {r.dataset for r in rows}
    notes = [f"- {ln}" for ln in text.splitlines() if any(ln.startswith(f"{lab}: `dvc exp run") for lab in labels)]
    if not rows or len(notes) != len(labels):
        raise SystemExit("no quality table with one note per dataset in that output (a finished quality.py run?)")
    return rows, notes


def run_one(name: str, sets: list[str], workdir: Path, env: dict[str, str]) -> tuple[list[Row], str] | None:
    """``dvc exp run -S dataset=<name> ...`` in a fresh scratch project; ``None`` when the data is absent."""
    tree = compose([f"dataset={name}", *sets], root=ROOT)  # unknown names stop here, in one line
    try:
        check_source(tree, ROOT)
    except VesselsegError as err:
        print(f"SKIP {name}: {err}")
        return None
    shared = workdir / "shared"
    if not shared.exists() and (ROOT.parent / "shared").is_dir():
        shared.symlink_to(ROOT.parent / "shared", target_is_directory=True)
    project = workdir / name
    shutil.rmtree(project, ignore_errors=True)  # a rerun starts from a fresh copy
    scratch.make_project(project, {}, root=ROOT, env=env)
    cmd = ["dvc", "exp", "run", "-S", f"dataset={name}", *[x for s in sets for x in ("-S", s)]]
    print(f"\n$ {shlex.join(cmd)}   (in {project})", flush=True)
    started = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    t0 = time.monotonic()
    out = scratch.run(cmd, project, env)
    wall = time.monotonic() - t0
    (workdir / f"{name}.log").write_text(out)
    stages = {m[0]: float(m[1]) for m in re.findall(r"stage (\w+) finished in ([\d.]+) s", out)}
    metrics = json.loads((project / "reports/metrics.json").read_text())
    train = json.loads((project / "reports/train/metrics.json").read_text())
    split = json.loads((project / "data/prepared/split.json").read_text())
    n_images = {k: len(v) for k, v in split.items() if isinstance(v, list)}
    note = (
        f"- {LABELS.get(name, name)}: `{shlex.join(cmd)}`, {started}, {os.cpu_count()} CPUs, {load_text()} at the end; "
        f"{train.get('epochs_run')} epochs, best epoch {train.get('best_epoch')}; stages (s) "
        + ", ".join(f"{k} {v:.1f}" for k, v in stages.items())
    )
    print(note.removeprefix("- "))
    return rows_for(name, metrics, wall, n_images), note


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", default=["drive", "octa500-3m"], help="conf/dataset names")
    ap.add_argument(
        "-S",
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="OVERRIDE",
        help="more Hydra overrides, as with dvc exp run -S (e.g. train.max_minutes=10)",
    )
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/vesselseg-quality"), help="scratch folder")
    ap.add_argument("--threads", type=int, default=None, help="VESSELSEG_THREADS for the runs")
    ap.add_argument("--write-readme", action="store_true", help="rewrite the marked block of --readme")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    ap.add_argument(
        "--readme-from",
        type=Path,
        nargs="+",
        metavar="LOG",
        help="rewrite the block from the saved output of finished runs instead of running",
    )
    args = ap.parse_args(argv)
    if args.readme_from:
        for log_file in args.readme_from:
            rows, notes = parse_output(log_file.read_text(encoding="utf-8"))
            rewrite_readme(args.readme, rows, notes)
            print(f"wrote {args.readme} from {log_file}")
        return 0
    try:
        for name in args.names:
            compose([f"dataset={name}", *args.sets], root=ROOT)
    except VesselsegError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    started = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"{started}; {platform.node()}; {load_text()}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    env = scratch.scratch_env(threads=args.threads)
    rows: list[Row] = []
    notes: list[str] = []
    for name in args.names:
        done = run_one(name, args.sets, args.workdir, env)
        if done is not None:
            rows += done[0]
            notes.append(done[1])
    print()
    print(markdown(rows))
    verdicts = [r.verdict for r in rows if r.verdict]
    print("\nverdict:", "FAIL" if "FAIL" in verdicts else "PASS" if verdicts else "no targets for these datasets")
    if args.write_readme and rows:
        rewrite_readme(args.readme, rows, notes)
        print(f"wrote {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
