"""Shared helpers of the benchmark scripts: timing, tables, PASS/FAIL lines, the verdict.

Why one module: every script must print its figures the same way (a small table, one
``PASS:``/``FAIL:`` line per target, ``VERDICT:`` last) so ``run_all.py`` can collect
them with one pattern, and every script must time the same way (median of repeats,
candidates interleaved round by round so load drift on a shared machine hits all of
them alike).  Benchmarks print (their output is the product); libraries log.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Checks",
    "format_table",
    "geomean",
    "header",
    "interleaved",
    "load_text",
    "median",
    "median_time",
    "print_table",
]


def load_text() -> str:
    """The 1/5/15-minute load averages and the core count, for judging noise."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:  # not available on every platform
        return f"load n/a, {os.cpu_count()} cores"
    return f"load {one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min) on {os.cpu_count()} cores"


def header(title: str, **facts: Any) -> None:
    """First lines of every benchmark: what, when, where, and how busy the machine is."""
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"== {title} ==")
    print(f"{now}; {platform.node()}; Python {platform.python_version()}; {load_text()}")
    for k, v in facts.items():
        print(f"{k}: {v}")
    sys.stdout.flush()


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def geomean(values: Sequence[float]) -> float:
    """Geometric mean: the summary of ratios (0.5 and 2.0 average to 1.0); NaN for no values."""
    return statistics.geometric_mean(values) if values else float("nan")


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 0) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls (after ``warmup`` untimed calls)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return median(times)


def interleaved(fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 0) -> dict[str, list[float]]:
    """Wall times (s) of each candidate, run round-robin ``a, b, a, b, ...``.

    Why round-robin: on a machine shared with other jobs the load drifts over minutes;
    timing all of ``a`` then all of ``b`` would fold that drift into the ratio.  Take
    per-round ratios (``times[a][i] / times[b][i]``) for the most robust comparison.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - t0)
    return out


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], floatfmt: str = ".3f") -> None:
    """Print :func:`format_table`'s table."""
    print(format_table(headers, rows, floatfmt))
    sys.stdout.flush()


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], floatfmt: str = ".3f") -> str:
    """A plain right-aligned text table (first column left-aligned)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return format(v, floatfmt)
        return str(v)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]

    def line(vals: Sequence[str]) -> str:
        return "  ".join(
            v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(vals, widths, strict=False))
        )

    return "\n".join([line(list(headers)), line(["-" * w for w in widths]), *(line(r) for r in cells)])


@dataclass
class Checks:
    """Targets checked by one script: one ``PASS:``/``FAIL:`` line each, ``VERDICT:`` last.

    ``note`` lines (measured but not a target) print as ``INFO:``.  ``finish`` returns
    the exit code: 0 if every check passed, 1 otherwise (``run_all.py`` reads the
    verdict line, not the code, and treats a missing verdict as a crash).
    """

    results: list[tuple[str, bool]] = field(default_factory=list)

    def check(self, name: str, value: float, target: float, op: str = "<=", unit: str = "", fmt: str = ".3f") -> bool:
        ok = value <= target if op == "<=" else value >= target
        self.results.append((name, ok))
        print(f"{'PASS' if ok else 'FAIL'}: {name} = {value:{fmt}}{unit} (target {op} {target:{fmt}}{unit})")
        sys.stdout.flush()
        return ok

    def flag(self, name: str, ok: bool, detail: str = "") -> bool:
        self.results.append((name, ok))
        print(f"{'PASS' if ok else 'FAIL'}: {name}{': ' + detail if detail else ''}")
        sys.stdout.flush()
        return ok

    @staticmethod
    def note(text: str) -> None:
        print(f"INFO: {text}")

    def finish(self) -> int:
        failed = [name for name, ok in self.results if not ok]
        print(f"VERDICT: {'PASS' if not failed else 'FAIL (' + ', '.join(failed) + ')'}  [{load_text()}]")
        sys.stdout.flush()
        return 0 if not failed else 1
