"""Run every benchmark under ``benchmarks/`` and print one summary table, verdict last.

Each ``bench_*.py`` runs in its own process (so one's imports, threads and memory do not
colour another's timings), one after the other, its output streamed as it comes.  From
each we keep the ``PASS``/``FAIL`` lines and the ``VERDICT:`` line.  A script that exits
without a verdict line (a traceback, a kill) has *crashed*; one that printed its verdict
has *reported*, whatever the verdict.

Exit code: 0 when every script reported, even with FAIL verdicts (benchmarks measure,
they do not gate); 1 when a script crashed.  The full log is also written to
``benchmarks/results/<UTC time>.txt`` (git-ignored).

Usage::

    python benchmarks/run_all.py                 # everything (tens of minutes: includes the default dvc repro)
    python benchmarks/run_all.py --quick         # --quick passed to every script that has it
    python benchmarks/run_all.py --only projection --only input_pipeline
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import format_table, load_text

HERE = Path(__file__).resolve().parent
ORDER = ("projection", "stitching", "input_pipeline", "memory_format", "pipeline")  # cheap and independent first
_CHECK = re.compile(r"\b(PASS|FAIL)\b")


@dataclass
class Outcome:
    name: str
    code: int = 0
    seconds: float = 0.0
    load: str = ""
    checks: list[str] = field(default_factory=list)
    verdict: str | None = None

    @property
    def crashed(self) -> bool:
        return self.verdict is None

    @property
    def status(self) -> str:
        if self.crashed:
            return f"CRASH (exit {self.code})"
        return "PASS" if self.verdict.startswith("PASS") else "FAIL"  # type: ignore[union-attr]


def scripts() -> list[Path]:
    found = {p.stem.removeprefix("bench_"): p for p in HERE.glob("bench_*.py")}
    ordered = [found.pop(n) for n in ORDER if n in found]
    return ordered + [found[n] for n in sorted(found)]


def supports_quick(script: Path) -> bool:
    return "--quick" in script.read_text(encoding="utf-8")


def run_one(script: Path, quick: bool, log: list[str]) -> Outcome:
    name = script.stem.removeprefix("bench_")
    cmd = [sys.executable, str(script)] + (["--quick"] if quick and supports_quick(script) else [])
    out = Outcome(name, load=load_text())
    banner = f"\n##### {name}: {' '.join(cmd[1:])}  [{out.load}]"
    print(banner, flush=True)
    log.append(banner + "\n")
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=HERE.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        log.append(line)
        text = line.strip()
        if text.startswith("VERDICT:"):
            out.verdict = text.removeprefix("VERDICT:").strip()
        elif _CHECK.search(text):
            out.checks.append(text)
    out.code = proc.wait()
    out.seconds = time.perf_counter() - t0
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="pass --quick to every script that supports it")
    ap.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help="run only this benchmark (name without bench_ and .py); repeatable",
    )
    args = ap.parse_args(argv)
    todo = scripts()
    if args.only:
        unknown = set(args.only) - {p.stem.removeprefix("bench_") for p in todo}
        if unknown:
            print(f"error: unknown benchmark(s) {sorted(unknown)}; have {[p.stem for p in todo]}", file=sys.stderr)
            return 2
        todo = [p for p in todo if p.stem.removeprefix("bench_") in args.only]
    started = dt.datetime.now(dt.UTC)
    log: list[str] = [f"run_all {' '.join(argv or sys.argv[1:])} at {started:%Y-%m-%d %H:%M UTC}; {load_text()}\n"]
    print(log[0], end="", flush=True)
    outcomes = [run_one(p, args.quick, log) for p in todo]

    lines = ["", "===== summary ====="]
    lines += [f"{o.name:15s} {c}" for o in outcomes for c in o.checks]
    rows = [
        [
            o.name,
            f"{o.seconds:.0f}",
            o.load.split(" (")[0],
            sum(_CHECK.search(c).group(1) == "PASS" for c in o.checks),  # type: ignore[union-attr]
            sum(_CHECK.search(c).group(1) == "FAIL" for c in o.checks),
            o.status,
        ]
        for o in outcomes
    ]  # type: ignore[union-attr]
    lines += ["", format_table(["benchmark", "s", "load at start", "PASS lines", "FAIL lines", "verdict"], rows)]
    crashed = [o.name for o in outcomes if o.crashed]
    failed = [o.name for o in outcomes if not o.crashed and o.status == "FAIL"]
    overall = (
        "CRASH (" + ", ".join(crashed) + ")" if crashed else ("FAIL (" + ", ".join(failed) + ")" if failed else "PASS")
    )
    lines += ["", f"OVERALL VERDICT: {overall}  [{load_text()}]"]
    summary = "\n".join(lines) + "\n"
    print(summary, end="", flush=True)
    try:
        from vesselseg import atomic

        target = HERE / "results" / f"{started:%Y%m%dT%H%M%SZ}.txt"
        target.parent.mkdir(exist_ok=True)
        atomic.write_text(target, "".join(log) + summary)
        print(f"log: {target.relative_to(HERE.parent)}")
    except OSError as err:  # a read-only checkout still gets the summary on stdout
        print(f"(log not written: {err})")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
