"""Run every recipe on one dataset and write the recipe table (``reports/recipes.md``).

Usage (from the repository root, with the venv's python)::

    python benchmarks/recipes.py                      # every recipe on DRIVE (conf/dataset/drive.yaml)
    python benchmarks/recipes.py --recipes knn vesselness --cap-minutes 10
    python benchmarks/recipes.py --dataset synthetic-fundus -S data.synthetic_fundus.size=64

Each recipe runs through the pipeline's own stages (``vesselseg`` CLI: patches,
train, predict, evaluate) in a scratch folder, with the params ``dvc exp run -S
dataset=<dataset> -S recipe=<recipe> -S <overrides>`` would write: the same Hydra
composition of ``conf/`` (``vesselseg.recipes.compose``), so a row is what a user's
experiment gets.  A recipe that pins its dataset (``ipn`` pins the synthetic OCTA
volumes) keeps it, as in the composition.  A relative ``data.source`` is read from the
repository root, as DVC runs stages there.
Recipes with the same ``data`` and ``prepare`` share one download + prepare.  Each
recipe runs in its own process group, killed at ``--cap-minutes``; a recipe that
fails or runs out of time keeps its row ("failed: <one line>").  Wall time is that
of the recipe's own stages (process start-up included); the shared data
preparation is timed separately in the table's header.  Extra rows run a recipe on
another dataset config: ``--also octa-unet4@octa500-3m`` (added by default when
``../shared/datasets/OCTA-500_3M_2D`` exists).

MLflow logging is off (``VESSELSEG_TRACKING=0``) unless ``--track``: scratch runs
are not experiments of the repository.  ``VESSELSEG_THREADS`` is passed through.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vesselseg.errors import VesselsegError
from vesselseg.params import flatten
from vesselseg.recipes import (
    RecipeRow,
    check_source,
    compose,
    list_choices,
    list_recipes,
    load_recipe,
    one_line,
    write_table,
)
from vesselseg.registry import info

log = logging.getLogger("benchmarks.recipes")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
# stages run in-process one after the other by one child: one interpreter start per recipe
_CHILD = "import json, sys\nfrom vesselseg.cli import main\nfor argv in json.loads(sys.argv[1]):\n    main(argv)\n"


@dataclass(frozen=True)
class Job:
    recipe: str
    dataset: str  # a conf/dataset name


def _run(
    argvs: list[list[str]], *, cwd: Path, env: dict[str, str], timeout_s: float, log_file: Path
) -> tuple[bool, str, float]:
    """Run CLI invocations in one child process; ``(ok, one-line reason, seconds)``."""
    t0 = time.monotonic()
    with open(log_file, "w", encoding="utf-8") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, json.dumps(argvs)],
            cwd=cwd,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return False, f"time cap of {timeout_s:.0f} s reached", time.monotonic() - t0
    seconds = time.monotonic() - t0
    if code == 0:
        return True, "", seconds
    text = log_file.read_text(encoding="utf-8", errors="replace")
    errors = [ln for ln in text.splitlines() if ln.startswith("error:") or "Error" in ln]
    return False, one_line(errors[-1] if errors else text), seconds


def _params_for(job: Job, sets: list[str], conf: Path | None) -> dict[str, Any]:
    """The composition ``dvc exp run -S dataset=.. -S recipe=.. -S sets..`` writes; source made absolute.

    A recipe that pins its dataset (``ipn``: ``data.dataset: synthetic``) runs on that
    dataset's config instead of the job's, so no other dataset's preprocessing leaks in.
    """
    pinned = (load_recipe(job.recipe, conf).get("data") or {}).get("dataset")
    known = {c.name for c in list_choices("dataset", conf)}
    dataset = pinned if pinned in known else job.dataset
    tree = compose([f"dataset={dataset}", f"recipe={job.recipe}", *sets], root=conf)
    source = tree["data"].get("source")
    if source:
        tree["data"]["source"] = os.pathsep.join(str((REPO / p).resolve()) for p in str(source).split(os.pathsep))
        check_source(tree, REPO)
    return tree


def _metrics_row(job: Job, run_dir: Path, dataset: str, seconds: float) -> RecipeRow:
    metrics = json.loads((run_dir / "reports" / "metrics.json").read_text())
    train = json.loads((run_dir / "reports" / "train" / "metrics.json").read_text())
    flat = {k: v for k, v in flatten(metrics).items() if isinstance(v, (int, float))}
    note = ", ".join(f"{k} {train[k]}" for k in ("best_k", "threshold", "epochs_run") if k in train)
    return RecipeRow(
        job.recipe,
        dataset=dataset,
        metrics=flat,
        wall_seconds=seconds,
        train_seconds=train.get("train_seconds"),
        note=note,
    )


def run_benchmark(
    jobs: list[Job],
    *,
    workdir: Path,
    sets: list[str] | None = None,
    cap_minutes: float = 15.0,
    track: bool = False,
    conf: Path | None = None,
) -> tuple[list[RecipeRow], dict[str, float]]:
    """Run each job (composed from ``conf``); returns the table rows and the seconds spent preparing each dataset."""
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", DVC_NO_ANALYTICS="1")
    if not track:
        env["VESSELSEG_TRACKING"] = "0"
    rows: list[RecipeRow] = []
    data_dirs: dict[str, tuple[Path, bool, str]] = {}
    prep_seconds: dict[str, float] = {}
    for job in jobs:
        try:
            tree = _params_for(job, list(sets or []), conf)
        except VesselsegError as err:
            rows.append(RecipeRow(job.recipe, dataset=job.dataset, note=f"failed: {one_line(str(err))}"))
            continue
        dataset = tree["data"]["dataset"]
        key = hashlib.sha256(
            json.dumps([tree["data"], tree["prepare"]], sort_keys=True, default=str).encode()
        ).hexdigest()[:10]
        data_dir = workdir / "data" / f"{dataset}-{key}"
        if key not in data_dirs:
            data_dir.mkdir(parents=True, exist_ok=True)
            (data_dir / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
            p = str(data_dir / "params.yaml")
            ok, why, secs = _run(
                [
                    ["--params", p, "download", "--out", "raw"],
                    ["--params", p, "prepare", "--raw", "raw", "--out", "prepared"],
                ],
                cwd=data_dir,
                env=env,
                timeout_s=cap_minutes * 60,
                log_file=data_dir / "log.txt",
            )
            data_dirs[key] = (data_dir, ok, why)
            prep_seconds[f"{dataset} ({key})"] = round(secs, 1)
            print(f"[data] {dataset}: {'ok' if ok else 'failed: ' + why} in {secs:.0f}s", flush=True)
        data_dir, ok, why = data_dirs[key]
        if not ok:
            rows.append(RecipeRow(job.recipe, dataset=dataset, note=f"failed: data preparation: {why}"))
            continue
        run_dir = workdir / "runs" / f"{job.recipe}-{dataset}"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        (run_dir / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
        p, prep = str(run_dir / "params.yaml"), str(data_dir / "prepared")
        argvs = []
        if info(tree["model"]["name"]).neural:  # the classical families fit on prepared images
            argvs.append(["--params", p, "patches", "--prepared", prep, "--out", "patches"])
        argvs += [
            ["--params", p, "train", "--patches", "patches", "--prepared", prep],
            ["--params", p, "predict", "--prepared", prep, "--out", "predictions"],
            ["--params", p, "evaluate", "--prepared", prep, "--predictions", "predictions"],
        ]
        ok, why, secs = _run(argvs, cwd=run_dir, env=env, timeout_s=cap_minutes * 60, log_file=run_dir / "log.txt")
        if ok:
            try:
                row = _metrics_row(job, run_dir, dataset, secs)
            except (OSError, ValueError) as err:
                row = RecipeRow(job.recipe, dataset=dataset, wall_seconds=secs, note=f"failed: {one_line(str(err))}")
        else:
            row = RecipeRow(job.recipe, dataset=dataset, wall_seconds=secs, note=f"failed: {why}")
        print(f"[{job.recipe}] {dataset}: {'ok' if ok else row.note} in {secs:.0f}s", flush=True)
        rows.append(row)
    return rows, prep_seconds


def _parse_also(text: str) -> Job:
    recipe, _, dataset = text.partition("@")
    if not recipe or not dataset:
        raise SystemExit(f"--also {text!r}: expected RECIPE@DATASET (a conf/dataset name)")
    return Job(recipe, dataset)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", nargs="*", default=None, help="recipe names (default: all)")
    ap.add_argument("--dataset", default="drive", help="a conf/dataset name")
    ap.add_argument("--also", action="append", default=None, metavar="RECIPE@DATASET")
    ap.add_argument(
        "-S",
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="OVERRIDE",
        help="Hydra override over dataset + recipe, as with dvc exp run -S",
    )
    ap.add_argument("--cap-minutes", type=float, default=15.0, help="per-recipe wall-clock cap")
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "recipes.md")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one, removed)")
    ap.add_argument("--conf-dir", type=Path, default=None, help="Hydra config folder (default: the repository's conf/)")
    ap.add_argument("--track", action="store_true", help="log the runs to MLflow")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    try:
        names = args.recipes or [r.name for r in list_recipes(args.conf_dir)]
        compose([f"dataset={args.dataset}", *args.sets], root=args.conf_dir)  # bad names stop here, in one line
    except VesselsegError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    jobs = [Job(n, args.dataset) for n in names]
    also = args.also
    if also is None and args.recipes is None and args.dataset == "drive" and (SHARED / "OCTA-500_3M_2D").is_dir():
        also = ["octa-unet4@octa500-3m"]
    jobs += [_parse_also(a) for a in also or []]

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vesselseg-recipes-"))
    try:
        rows, prep = run_benchmark(
            jobs, workdir=workdir, sets=args.sets, cap_minutes=args.cap_minutes, track=args.track, conf=args.conf_dir
        )
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    prep_txt = ", ".join(f"{k} {v:.0f}s" for k, v in prep.items()) or "none"
    title = (
        f"Recipes on {args.dataset} (benchmarks/recipes.py, cap {args.cap_minutes:g} min per recipe, "
        f"{os.cpu_count()} CPUs)\n\nData preparation (shared): {prep_txt}."
        + (f" Overrides: {' '.join(args.sets)}." if args.sets else "")
    )
    text = write_table(rows, args.out, title)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
