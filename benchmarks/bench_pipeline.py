"""Benchmark: the default ``dvc repro``, stage by stage, and a ``dvc repro`` with nothing to do.

Targets (issue 5, item 4):
- total wall time of the default ``dvc repro`` (this repository's ``params.yaml``) within
  the pipeline issue's bound: 600 s on this 2-core machine;
- a no-op ``dvc repro`` (everything up to date) under 5 s (median of ``--noop-repeats``).

The run happens in a scratch repository, built as ``tests/test_pipeline_e2e.py`` builds
its own (copy ``dvc.yaml``, ``stages/``, ``src/``, ``pyproject.toml``, ``.gitignore``,
``params.yaml``; ``git init``; ``dvc init``; one commit), so the working tree, its DVC
cache and its MLflow store are left alone.  Per stage the table shows two times:
``in-process`` is what the stage itself logs (``stage <name> finished in X s``: the
work, without interpreter start and imports), ``wall`` is the time between DVC's
``Running stage`` lines as they arrive (interpreter, imports, the work, DVC hashing
and caching the outputs).  ``MLFLOW_TRACKING_URI`` is unset for the run, so tracking
goes to the scratch repository's own ``mlflow.db``.

Usage::

    python benchmarks/bench_pipeline.py            # the default pipeline: minutes
    python benchmarks/bench_pipeline.py --quick    # the tiny config of the e2e test: a smoke run
    python benchmarks/bench_pipeline.py --keep     # keep the scratch repository (path printed)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Checks, header, median, print_table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))  # tools/ (test and benchmark support)

from tools import scratch  # noqa: E402

TOTAL_TARGET_S = 600.0
NOOP_TARGET_S = 5.0
STAGES = ("download", "prepare", "patches", "train", "predict", "evaluate")
_RUNNING = re.compile(r"Running stage '([\w-]+)'")
_FINISHED = re.compile(r"stage ([\w-]+) finished in ([0-9.]+) s")


def tiny_overrides() -> dict[str, Any]:
    """The e2e test's tiny config, imported so the smoke run and the test cannot drift apart."""
    sys.path.insert(0, str(ROOT))
    from tests.test_pipeline_e2e import TINY

    return TINY


def timed_repro(
    repo: Path, env: dict[str, str], timeout: float
) -> tuple[float, dict[str, float], dict[str, float], str]:
    """Run ``dvc repro``, stamping each output line as it arrives.

    Returns (total wall s, wall s per stage, in-process s per stage, the output).
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        ["dvc", "repro"], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    starts: list[tuple[str, float]] = []
    inproc: dict[str, float] = {}
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        now = time.perf_counter() - t0
        lines.append(line)
        if m := _RUNNING.search(line):
            starts.append((m.group(1), now))
            print(f"  {now:7.1f} s  running {m.group(1)}", flush=True)
        if m := _FINISHED.search(line):
            inproc[m.group(1)] = float(m.group(2))
        if now > timeout:
            proc.kill()
            raise SystemExit(f"dvc repro still running after {timeout:.0f} s (--timeout): stopped")
    code = proc.wait()
    total = time.perf_counter() - t0
    out = "".join(lines)
    if code != 0:
        raise SystemExit(f"dvc repro failed (exit {code}):\n{out[-4000:]}")
    wall = {}
    for i, (name, start) in enumerate(starts):
        end = starts[i + 1][1] if i + 1 < len(starts) else total
        wall[name] = end - start
    return total, wall, inproc, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the tiny config of tests/test_pipeline_e2e.py (smoke run)")
    ap.add_argument(
        "--params", type=Path, default=ROOT / "params.yaml", help="params file to run (default: the repo's)"
    )
    ap.add_argument("--noop-repeats", type=int, default=3)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="set VESSELSEG_THREADS for the stages (default: unset, as a user's dvc repro)",
    )
    ap.add_argument("--timeout", type=float, default=1800.0, help="give up on dvc repro after this many seconds")
    ap.add_argument("--keep", action="store_true", help="keep the scratch repository")
    args = ap.parse_args(argv)

    if shutil.which("dvc", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}") is None:
        print("error: dvc not found next to this interpreter or on PATH", file=sys.stderr)
        return 2
    params = yaml.safe_load(args.params.read_text())
    if args.quick:
        params = scratch.merge(params, tiny_overrides())
    env = scratch.scratch_env(threads=args.threads)
    if args.threads is None:
        env.pop("VESSELSEG_THREADS", None)
    dvc_version = scratch.run(["dvc", "--version"], ROOT, env).strip()
    header(
        "the default dvc repro" + (" (--quick: the e2e test's tiny config)" if args.quick else ""),
        params=f"{args.params}" + (" + tests/test_pipeline_e2e.py TINY" if args.quick else ""),
        setup=f"dataset {params['data']['dataset']}, train.epochs {params['train']['epochs']}, "
        f"model depth {params['model']['depth']} base {params['model']['base_channels']}, "
        f"threads {env.get('VESSELSEG_THREADS', params['train'].get('threads', 0) or 'every core')}; dvc {dvc_version}",
    )

    tmp = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    repo = tmp / "project"
    try:
        # the full params as they will run (overrides already merged above)
        scratch.make_project(repo, params, root=ROOT, env=env)
        print(f"scratch repository: {repo}\n\ndvc repro:", flush=True)
        total, wall, inproc, _out = timed_repro(repo, env, args.timeout)
        missing = [s for s in STAGES if s not in wall]
        noop_times, noop_ran = [], False
        for _ in range(args.noop_repeats):
            t0 = time.perf_counter()
            again = scratch.run(["dvc", "repro"], repo, env)
            noop_times.append(time.perf_counter() - t0)
            noop_ran = noop_ran or bool(_RUNNING.search(again))
    finally:
        if args.keep:
            print(f"kept: {repo}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print()
    rows = [
        [s, inproc.get(s, float("nan")), wall.get(s, float("nan")), f"{100 * wall.get(s, 0.0) / total:.0f}%"]
        for s in [*STAGES, *(s for s in wall if s not in STAGES)]
    ]
    rows.append(["total (dvc repro)", sum(inproc.values()), total, "100%"])
    print_table(["stage", "in-process s", "wall s", "share"], rows, floatfmt=".1f")
    print(f"\nno-op dvc repro: {', '.join(f'{t:.2f}' for t in noop_times)} s\n")

    checks = Checks()
    checks.flag("every stage ran", not missing, f"missing {missing}" if missing else ", ".join(wall))
    checks.check(
        "default dvc repro total wall time" if not args.quick else "quick dvc repro total wall time",
        total,
        TOTAL_TARGET_S,
        unit=" s",
        fmt=".1f",
    )
    checks.check("no-op dvc repro (median)", median(noop_times), NOOP_TARGET_S, unit=" s", fmt=".2f")
    checks.flag("no-op dvc repro runs no stage", not noop_ran)
    if args.quick:
        Checks.note(
            "--quick ran the tiny config: the 600 s bound is meant for the default params (run without --quick)"
        )
    return checks.finish()


if __name__ == "__main__":
    sys.exit(main())
