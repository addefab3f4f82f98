"""Benchmark: the training input pipeline against bare forward+backward passes.

Target (issue 5, item 3): samples/s of the real training loop (memory-mapped patch
arrays -> albumentations online augmentation -> tensors, prepared by the background
prefetch thread of ``PatchBatches``, consumed by ``Trainer.train_step``) divided by
samples/s of ``Trainer.train_step`` alone on batches already in memory, same model,
same batch size, same step code: >= 0.90.

Setup, all from ``params.yaml`` (defaults: 48 x 48 patches, batch 32, U-Net depth 3 /
base 16, bce+dice, Adam, flip + rot90, torch threads = ``train.threads`` or
``VESSELSEG_THREADS``, i.e. what ``dvc repro`` trains with).  The patch set is written
as the patches stage writes it (``{train}_{images,labels,fov}.npy``) and opened with
``load_patches`` (memory-mapped), ``--n-patches`` of them (default 2000, about what the
default synthetic dataset gives).  Each repeat times ``--steps`` steps of (a) the real
loop over ``PatchBatches.epoch(e)`` (a fresh epoch, so the prefetch thread starts cold
each time, as it does every epoch) and (b) the same number of steps over pre-made
tensors; a and b alternate (a, b, a, b, ...) and the ratio is the median of the
per-round ratios.  For diagnosis the table also shows the loader alone (main thread,
no model) split into its parts: memmap gather, albumentations, conversion to tensors.

Usage::

    python benchmarks/bench_input_pipeline.py [--steps 16] [--repeats 5] [--n-patches 2000]
    python benchmarks/bench_input_pipeline.py --quick       # 4 steps, 3 repeats, 600 patches
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Checks, header, interleaved, median, print_table

from vesselseg import atomic
from vesselseg.augment import online_augmenter
from vesselseg.device import set_threads
from vesselseg.families import network_config
from vesselseg.losses import build_loss
from vesselseg.models import build_model, count_parameters
from vesselseg.normalize import batch_to_input
from vesselseg.params import load_params
from vesselseg.patches import load_patches
from vesselseg.training.batches import PatchBatches, augment_batch
from vesselseg.training.distributed import World
from vesselseg.training.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.90


def write_patch_set(folder: Path, n: int, size: int, seed: int) -> None:
    """Patches shaped like the patches stage's: smooth grey images, thin-ish {0,1} labels, FOV.

    Content does not change the cost of flips, rot90 or the copies; the arrays only
    need the stage's dtypes, shapes and on-disk format (``.npy`` read by memmap).
    """
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(n, size, size)).astype(np.float32)
    smooth = (noise + np.roll(noise, 1, 1) + np.roll(noise, 1, 2) + np.roll(noise, (1, 1), (1, 2))) / 4
    images = np.clip(128 + 60 * smooth, 0, 255).astype(np.uint8)
    labels = (smooth > 1.0).astype(np.uint8)
    fov = np.ones((n, size, size), dtype=np.uint8)
    fov[: n // 4, :, : size // 6] = 0  # some patches touch the FOV border
    for kind, arr in (("images", images), ("labels", labels), ("fov", fov)):
        atomic.write_npy(folder / f"train_{kind}.npy", arr)


def reference_augment(aug: Any, im: np.ndarray, lb: np.ndarray, fv: np.ndarray) -> tuple[np.ndarray, ...]:
    """The plain per-sample, per-target albumentations call (what ``augment_batch`` must equal)."""
    if aug is None:
        return im, lb, fv
    out = [aug(image=a, mask=b, fov=c) for a, b, c in zip(im, lb, fv, strict=True)]
    return tuple(np.stack([o[k] for o in out]) for k in ("image", "mask", "fov"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--n-patches", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=16, help="training steps per timed run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="4 steps, 3 repeats, 600 patches (a smoke run)")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.n_patches = 4, 3, 600

    params = load_params(args.params)
    tp, size = params.train, params.patches.size
    threads = set_threads(tp.threads)
    cfg = network_config(params.model)
    torch.manual_seed(params.seed)
    model = build_model(cfg)
    header(
        "training input pipeline vs bare forward+backward",
        setup=f"{args.n_patches} patches {size}x{size}, batch {tp.batch_size}, {cfg.get('name')} depth {cfg.get('depth')} "
        f"base {cfg.get('base_channels')} ({count_parameters(model)} params), loss {tp.loss}, {tp.optimizer}, "
        f"flip={tp.flip} rot90={tp.rotate90}, torch threads {threads}",
        timing=f"{args.steps} steps per run, {args.repeats} rounds of (a, b) interleaved, medians",
    )
    steps, batch = args.steps, tp.batch_size
    if steps * batch > args.n_patches:
        print(f"error: --steps {steps} x batch {batch} exceeds --n-patches {args.n_patches}", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="bench-input-") as tmp:
        write_patch_set(Path(tmp), args.n_patches, size, params.seed)
        images, labels, fov = load_patches(Path(tmp), "train")
        batches = PatchBatches(
            images, labels, fov, batch_size=batch, flip=tp.flip, rotate90=tp.rotate90, seed=params.seed
        )
        trainer = Trainer(
            model=model,
            model_config=cfg,
            loss_fn=build_loss(tp.loss, dice_weight=tp.dice_weight),
            params=tp,
            seed=params.seed,
            device=torch.device("cpu"),
            world=World(),
            steps_per_epoch=len(batches),
        )
        trainer.model.train()
        premade = [b for _, b in zip(range(steps), batches._batches(10_000), strict=False)]  # the first `steps`
        epoch_no = iter(range(1, 1_000_000))

        def real_loop() -> None:
            it = batches.epoch(next(epoch_no))
            try:
                for _, (x, y, m) in zip(range(steps), it, strict=False):  # the first `steps`
                    trainer.train_step(x, y, m)
            finally:
                it.close()  # stops the prefetch thread, as the end of an epoch does

        def bare_steps() -> None:
            for x, y, m in premade:
                trainer.train_step(x, y, m)

        times = interleaved({"a": real_loop, "b": bare_steps}, args.repeats, warmup=1)
        n = steps * batch
        rate_a = [n / t for t in times["a"]]
        rate_b = [n / t for t in times["b"]]
        ratios = [tb / ta for ta, tb in zip(times["a"], times["b"], strict=True)]
        ratio = median(ratios)

        # Diagnosis: the loader alone, in the main thread, split into its parts; and the
        # check that the stacked augmentation equals the per-target reference call.
        order = np.arange(n) % len(images)
        parts: dict[str, list[float]] = {
            "gather (memmap)": [],
            "augment (stacked, as used)": [],
            "augment (per target, reference)": [],
            "to tensors": [],
            "whole _make": [],
        }
        same = True
        for rep in range(args.repeats):
            acc = dict.fromkeys(parts, 0.0)
            for s in range(0, n, batch):
                idx = np.sort(order[s : s + batch])
                seed = rep * 1000 + s
                t0 = time.perf_counter()
                im, lb, fv = images[idx], labels[idx], fov[idx]
                t1 = time.perf_counter()
                aug_s = online_augmenter(flip=tp.flip, rotate90=tp.rotate90, seed=seed)
                fast = (im, lb, fv) if aug_s is None else augment_batch(aug_s, im, lb, fv)
                t2 = time.perf_counter()
                ref = reference_augment(online_augmenter(flip=tp.flip, rotate90=tp.rotate90, seed=seed), im, lb, fv)
                t3 = time.perf_counter()
                torch.from_numpy(batch_to_input(fast[0]))
                torch.from_numpy(np.ascontiguousarray(fast[1], dtype=np.float32))
                torch.from_numpy(np.ascontiguousarray(fast[2], dtype=np.float32))
                t4 = time.perf_counter()
                same = same and all(np.array_equal(f, r) for f, r in zip(fast, ref, strict=True))
                for k, dt in zip(list(parts)[:4], (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                    acc[k] += dt
            aug = online_augmenter(flip=tp.flip, rotate90=tp.rotate90, seed=rep)
            t0 = time.perf_counter()
            for s in range(0, n, batch):
                batches._make(order[s : s + batch], aug)
            acc["whole _make"] = time.perf_counter() - t0
            for k in parts:
                parts[k].append(acc[k])

    b_med = median(times["b"])
    rows = [
        [
            "(a) real loop: memmap + augment + prefetch + step",
            median(times["a"]),
            median(rate_a),
            1e3 * median(times["a"]) / steps,
        ],
        ["(b) bare step on tensors in memory", b_med, median(rate_b), 1e3 * b_med / steps],
    ]
    print()
    print_table(["run", "s / run", "samples/s", "ms / step"], rows)
    print("\nloader alone (main thread, no model), same batches; share = loader time / bare step time")
    print_table(
        ["part", "ms / batch", "us / sample", "share of step"],
        [
            [k, 1e3 * median(v) / steps, 1e6 * median(v) / n, f"{100 * median(v) / b_med:.1f}%"]
            for k, v in parts.items()
        ],
    )
    print(f"\nper-round ratios (a samples/s / b samples/s): {', '.join(f'{r:.3f}' for r in ratios)}\n")
    checks = Checks()
    checks.check("input pipeline: real loop / bare step (samples/s)", ratio, TARGET, op=">=")
    checks.flag(
        "stacked augmentation equals the per-target albumentations call", same, f"{args.repeats} x {n} samples compared"
    )
    Checks.note(f"real loop {median(rate_a):.1f} samples/s, bare step {median(rate_b):.1f} samples/s")
    return checks.finish()


if __name__ == "__main__":
    sys.exit(main())
