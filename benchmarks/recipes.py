"""Run every recipe on one dataset and write the recipe table (``reports/recipes.md``).

Usage (from the repository root, with the venv's python)::

    python benchmarks/recipes.py                      # every recipe on DRIVE (../shared/datasets/DRIVE)
    python benchmarks/recipes.py --recipes knn vesselness --cap-minutes 10
    python benchmarks/recipes.py --dataset synthetic-fundus --source "" -S data.synthetic_fundus.size=64

Each recipe runs through the pipeline's own stages (``vesselseg`` CLI: patches,
train, predict, evaluate) in a scratch folder, with a params file = the working
tree's ``params.yaml`` (``--params``; it matches the code that runs) + the recipe + ``data.dataset``/``data.source`` (unless the recipe
pins its dataset, as ``ipn`` pins the synthetic OCTA volumes) + ``-S`` overrides.
Recipes with the same ``data`` and ``prepare`` share one download + prepare.  Each
recipe runs in its own process group, killed at ``--cap-minutes``; a recipe that
fails or runs out of time keeps its row ("failed: <one line>").  Wall time is that
of the recipe's own stages (process start-up included); the shared data
preparation is timed separately in the table's header.  Extra rows run a recipe on
another dataset: ``--also octa-unet4@octa500=/path/OCTA-500_3M_2D`` (added by
default when that shared folder exists).

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
from vesselseg.params import CLASSICAL_MODELS, flatten, parse_params, set_dotted
from vesselseg.recipes import (
    RecipeRow,
    one_line,
    list_recipes,
    load_recipe,
    merge_params,
    parse_sets,
    write_table,
)

log = logging.getLogger("benchmarks.recipes")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
# stages run in-process one after the other by one child: one interpreter start per recipe
_CHILD = "import json, sys\nfrom vesselseg.cli import main\nfor argv in json.loads(sys.argv[1]):\n    main(argv)\n"


@dataclass(frozen=True)
class Job:
    recipe: str
    dataset: str
    source: str | None


def _run(argvs: list[list[str]], *, cwd: Path, env: dict[str, str], timeout_s: float, log_file: Path) -> tuple[bool, str, float]:
    """Run CLI invocations in one child process; ``(ok, one-line reason, seconds)``."""
    t0 = time.monotonic()
    with open(log_file, "w", encoding="utf-8") as fh:
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(argvs)], cwd=cwd, env=env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
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


def _params_for(job: Job, base: dict[str, Any], sets: dict[str, Any], recipes_root: Path | None) -> dict[str, Any]:
    recipe = load_recipe(job.recipe, recipes_root)
    tree = merge_params(base, recipe)
    if "dataset" not in recipe.get("data", {}):  # a recipe that pins its dataset keeps it
        set_dotted(tree, "data.dataset", job.dataset)
        set_dotted(tree, "data.source", job.source)
    for key, value in sets.items():
        set_dotted(tree, key, value)
    parse_params(tree, f"recipe {job.recipe}")
    return tree


def _metrics_row(job: Job, run_dir: Path, dataset: str, seconds: float) -> RecipeRow:
    metrics = json.loads((run_dir / "reports" / "metrics.json").read_text())
    train = json.loads((run_dir / "reports" / "train" / "metrics.json").read_text())
    flat = {k: v for k, v in flatten(metrics).items() if isinstance(v, (int, float))}
    note = ", ".join(f"{k} {train[k]}" for k in ("best_k", "threshold", "epochs_run") if k in train)
    return RecipeRow(job.recipe, dataset=dataset, metrics=flat, wall_seconds=seconds,
                     train_seconds=train.get("train_seconds"), note=note)


def run_benchmark(
    jobs: list[Job],
    *,
    workdir: Path,
    base: dict[str, Any],
    sets: dict[str, Any] | None = None,
    cap_minutes: float = 15.0,
    track: bool = False,
    recipes_root: Path | None = None,
) -> tuple[list[RecipeRow], dict[str, float]]:
    """Run each job over the ``base`` params; returns the table rows and the seconds spent preparing each dataset."""
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", DVC_NO_ANALYTICS="1")
    if not track:
        env["VESSELSEG_TRACKING"] = "0"
    rows: list[RecipeRow] = []
    data_dirs: dict[str, tuple[Path, bool, str]] = {}
    prep_seconds: dict[str, float] = {}
    for job in jobs:
        try:
            tree = _params_for(job, base, sets or {}, recipes_root)
        except VesselsegError as err:
            rows.append(RecipeRow(job.recipe, dataset=job.dataset, note=f"failed: {one_line(str(err))}"))
            continue
        dataset = tree["data"]["dataset"]
        key = hashlib.sha256(json.dumps([tree["data"], tree["prepare"]], sort_keys=True, default=str).encode()).hexdigest()[:10]
        data_dir = workdir / "data" / f"{dataset}-{key}"
        if key not in data_dirs:
            data_dir.mkdir(parents=True, exist_ok=True)
            (data_dir / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
            p = str(data_dir / "params.yaml")
            ok, why, secs = _run(
                [["--params", p, "download", "--out", "raw"], ["--params", p, "prepare", "--raw", "raw", "--out", "prepared"]],
                cwd=data_dir, env=env, timeout_s=cap_minutes * 60, log_file=data_dir / "log.txt",
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
        if tree["model"]["name"] not in CLASSICAL_MODELS:
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
    recipe, _, rest = text.partition("@")
    dataset, _, source = rest.partition("=")
    if not recipe or not dataset:
        raise SystemExit(f"--also {text!r}: expected RECIPE@DATASET[=SOURCE]")
    return Job(recipe, dataset, source or None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", nargs="*", default=None, help="recipe names (default: all)")
    ap.add_argument("--dataset", default="drive")
    ap.add_argument("--source", default=str(SHARED / "DRIVE"), help="data.source ('' for none)")
    ap.add_argument("--also", action="append", default=None, metavar="RECIPE@DATASET[=SOURCE]")
    ap.add_argument("-S", "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--cap-minutes", type=float, default=15.0, help="per-recipe wall-clock cap")
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "recipes.md")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one, removed)")
    ap.add_argument("--recipes-dir", type=Path, default=None)
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml",
                    help="base params the recipes apply over (default: the working tree's, matching its code)")
    ap.add_argument("--track", action="store_true", help="log the runs to MLflow")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    names = args.recipes or [r.name for r in list_recipes(args.recipes_dir)]
    source = args.source or None
    if source and not Path(source).exists():
        print(f"dataset source {source} not found; pass --dataset/--source", file=sys.stderr)
        return 2
    jobs = [Job(n, args.dataset, source) for n in names]
    also = args.also
    octa = SHARED / "OCTA-500_3M_2D"
    if also is None and args.recipes is None and args.dataset == "drive" and octa.is_dir():
        also = [f"octa-unet4@octa500={octa}"]
    jobs += [_parse_also(a) for a in also or []]

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vesselseg-recipes-"))
    try:
        sets = parse_sets(args.sets)
        base = yaml.safe_load(args.params.read_text(encoding="utf-8")) or {}
        rows, prep = run_benchmark(jobs, workdir=workdir, base=base, sets=sets, cap_minutes=args.cap_minutes, track=args.track,
                                   recipes_root=args.recipes_dir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    prep_txt = ", ".join(f"{k} {v:.0f}s" for k, v in prep.items()) or "none"
    title = (f"Recipes on {args.dataset} (benchmarks/recipes.py, cap {args.cap_minutes:g} min per recipe, "
             f"{os.cpu_count()} CPUs)\n\nData preparation (shared): {prep_txt}."
             + (f" Overrides: {' '.join(args.sets)}." if args.sets else ""))
    text = write_table(rows, args.out, title)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
