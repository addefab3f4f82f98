"""Benchmark: OCTA projection against reading the files, and against the obvious loop.

Targets (from the issue):
- projection time / time to only read and decode the same files <= 1.25, for
  mean/max/min over the full depth and over a slab (same decoder, same thread count);
- the speed-up over the obvious per-slice loop (PIL-open each BMP, np.stack, reduce)
  is reported;
- peak memory of a projection never more than the volume itself plus one slice.

The volume is an OCTA-500 6 mm-sized one (400 B-scans of 640 x 400, 8-bit BMP as
OpenCV writes them: grey palette, bottom-up rows), generated into a temporary folder.
Timings are medians of ``--repeats`` runs (default 7) with the files in the page
cache (the first, cold read is discarded as warm-up); each ratio is the median of
per-round ratios, the baseline and the projection timed back to back.

"Read and decode" is our decoder producing images (``read_slice`` with a reused
buffer: rows top first, padding dropped), as cv2.imread and PIL produce them.  The
projection skips the flip and the copy (a reduction does not care about row order),
so the table also shows the stricter ratio against reading the raw rows alone.
Usage::

    python benchmarks/bench_projection.py [--n-bscans 400] [--depth 640] [--width 400]
        [--slab 200 440] [--repeats 7] [--workers 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from vesselseg.preprocess.projection import SliceReader, project_volume, read_slice

RATIO_TARGET = 1.25


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def paired_ms(base: Callable[[], object], fn: Callable[[], object], repeats: int) -> tuple[float, float, float]:
    """Time ``base`` and ``fn`` back to back, ``repeats`` times.

    Returns (median base ms, median fn ms, median of the per-round ratios fn / base).
    On a shared machine the load drifts between runs; a ratio taken within one round
    compares like with like, where a ratio of two separate medians would not.
    """
    b_times, f_times, ratios = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        base()
        t1 = time.perf_counter()
        fn()
        t2 = time.perf_counter()
        b_times.append(t1 - t0)
        f_times.append(t2 - t1)
        ratios.append((t2 - t1) / (t1 - t0))
    return 1e3 * statistics.median(b_times), 1e3 * statistics.median(f_times), statistics.median(ratios)


def peak_bytes(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def make_volume(folder: Path, n: int, depth: int, width: int, seed: int = 0) -> list[Path]:
    """Layered noise, so the files are not trivially compressible or constant."""
    rng = np.random.default_rng(seed)
    bands = (np.sin(np.arange(depth) / 25.0)[:, None] * 60 + 100).astype(np.int16)
    paths = []
    for k in range(1, n + 1):
        sl = np.clip(bands + rng.integers(-60, 60, size=(depth, width), dtype=np.int16), 0, 255).astype(np.uint8)
        ok, buf = cv2.imencode(".bmp", sl)
        if not ok:
            raise RuntimeError("cv2.imencode failed for BMP")
        p = folder / f"{k}.bmp"
        buf.tofile(p)
        paths.append(p)
    return paths


def read_only(paths: list[Path]) -> None:
    """Raw rows only: file order (bottom-up), padding kept; not yet an image."""
    reader = SliceReader()
    for p in paths:
        reader.read(p, None)


def decode_only(paths: list[Path]) -> None:
    """Read and decode to images (top row first, contiguous), as every other decoder does."""
    reader = SliceReader()
    for p in paths:
        read_slice(p, reader)


def naive(paths: list[Path], method: str, slab: tuple[int, int] | None) -> np.ndarray:
    """The obvious code: open every BMP with PIL, stack the volume, reduce it."""
    vol = np.stack([np.asarray(Image.open(p)) for p in paths])  # (n, depth, width)
    if slab is not None:
        vol = vol[:, slab[0] : slab[1], :]
    red = {"mean": np.mean, "max": np.max, "min": np.min}[method](vol, axis=1)
    return red.T.astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-bscans", type=int, default=400)
    ap.add_argument("--depth", type=int, default=640)
    ap.add_argument("--width", type=int, default=400)
    ap.add_argument("--slab", type=int, nargs=2, default=(200, 440))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--workers", type=int, default=2, help="also time project_volume with this many threads")
    args = ap.parse_args(argv)
    slab = (args.slab[0], args.slab[1])
    slice_bytes = args.depth * args.width
    volume_bytes = args.n_bscans * slice_bytes
    fails: list[str] = []

    with tempfile.TemporaryDirectory(prefix="bench-projection-") as tmp:
        t0 = time.perf_counter()
        paths = make_volume(Path(tmp), args.n_bscans, args.depth, args.width)
        print(
            f"volume: {args.n_bscans} B-scans of {args.depth}x{args.width} (depth x width), "
            f"{volume_bytes / 2**20:.0f} MiB, written in {time.perf_counter() - t0:.1f} s; slab {list(slab)}; "
            f"median of {args.repeats} runs"
        )
        read_only(paths)  # warm the page cache

        # Decoders: read + decode every slice once (no reduction).
        decoders: dict[str, Callable[[], object]] = {
            "ours: raw rows (no flip, padded)": lambda: read_only(paths),
            "ours: read_slice (decoded image)": lambda: decode_only(paths),
            "cv2.imread": lambda: [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in paths],
            "cv2.imdecode(np.fromfile)": lambda: [
                cv2.imdecode(np.fromfile(p, np.uint8), cv2.IMREAD_UNCHANGED) for p in paths
            ],
            "PIL Image.open + np.asarray": lambda: [np.asarray(Image.open(p)) for p in paths],
        }
        dec_ms = {name: median_ms(fn, args.repeats) for name, fn in decoders.items()}
        print("\nread + decode only (all slices)")
        print(f"{'decoder':34s} {'ms':>8s} {'MB/s':>8s}")
        for name, ms in dec_ms.items():
            print(f"{name:34s} {ms:8.1f} {volume_bytes / 1e6 / (ms / 1e3):8.0f}")

        # Correctness first: our projection must equal the naive one.
        for method in ("mean", "max", "min"):
            for sl in (None, slab):
                ours = project_volume(paths, method=method, slab=sl)  # type: ignore[arg-type]
                ref = naive(paths, method, sl)
                if not np.allclose(ours, ref, rtol=0, atol=1e-4):
                    fails.append(f"{method} slab={sl}: projection differs from the naive loop")

        print("\nprojection, 1 thread.  'decode' = read_slice on every file (our decoder, images top row")
        print("first), the target's baseline; 'raw' = the raw rows only (stricter: no flip, no copy).")
        print("Each ratio is the median over rounds of projection / baseline timed back to back.")
        print(
            f"'{args.workers} thr' = project_volume(workers={args.workers}); '/imread' = ours / cv2.imread read-only."
        )
        print(
            f"{'method':6s} {'range':>8s} {'dec ms':>7s} {'ours ms':>8s} {'/decode':>8s} {'/raw':>6s} {f'{args.workers} thr ms':>9s} {'/decode':>8s} {'/imread':>8s} {'naive ms':>9s} {'speed-up':>9s}"
        )
        ratios: list[tuple[str, float]] = []
        raw_fn = lambda: read_only(paths)  # noqa: E731
        dec_fn = lambda: decode_only(paths)  # noqa: E731
        for method in ("mean", "max", "min"):
            for sl in (None, slab):
                label = "full" if sl is None else f"{sl[0]}-{sl[1]}"
                run = lambda: project_volume(paths, method=method, slab=sl)  # type: ignore[arg-type]  # noqa: E731
                d_ms, ours, ratio = paired_ms(dec_fn, run, args.repeats)
                _, _, raw_ratio = paired_ms(raw_fn, run, args.repeats)
                _, thr, thr_ratio = paired_ms(
                    dec_fn, lambda: project_volume(paths, method=method, slab=sl, workers=args.workers), args.repeats
                )  # type: ignore[arg-type]
                slow = median_ms(lambda: naive(paths, method, sl), args.repeats)
                ratios.append((f"{method} {label}", ratio))
                imread_ratio = ours / dec_ms["cv2.imread"]
                print(
                    f"{method:6s} {label:>8s} {d_ms:7.1f} {ours:8.1f} {ratio:8.2f} {raw_ratio:6.2f} {thr:9.1f} {thr_ratio:8.2f} {imread_ratio:8.2f} {slow:9.1f} {slow / ours:8.1f}x"
                )

        peak_ours = peak_bytes(lambda: project_volume(paths, method="mean"))
        peak_slab = peak_bytes(lambda: project_volume(paths, method="max", slab=slab))
        peak_naive = peak_bytes(lambda: naive(paths, "mean", None))
        limit = volume_bytes + slice_bytes
        print("\npeak traced memory (tracemalloc)")
        print(f"{'run':28s} {'MiB':>8s}")
        print(f"{'ours, mean, full depth':28s} {peak_ours / 2**20:8.2f}")
        print(f"{'ours, max, slab':28s} {peak_slab / 2**20:8.2f}")
        print(f"{'naive, mean, full depth':28s} {peak_naive / 2**20:8.2f}")
        print(f"{'limit: volume + one slice':28s} {limit / 2**20:8.2f}")

    print()
    for name, ratio in ratios:
        ok = ratio <= RATIO_TARGET
        print(
            f"{'PASS' if ok else 'FAIL'}: {name}: projection / read-and-decode = {ratio:.2f} (target <= {RATIO_TARGET})"
        )
        if not ok:
            fails.append(f"{name} ratio {ratio:.2f}")
    for name, peak in (("mean full", peak_ours), ("max slab", peak_slab)):
        ok = peak <= limit
        print(f"{'PASS' if ok else 'FAIL'}: memory {name}: {peak / 2**20:.2f} MiB (target <= {limit / 2**20:.2f} MiB)")
        if not ok:
            fails.append(f"memory {name}")
    for f in fails:
        if "differs" in f:
            print(f"FAIL: {f}")
    print(f"VERDICT: {'PASS' if not fails else 'FAIL'}")
    return 0 if not fails else 1


if __name__ == "__main__":
    sys.exit(main())
