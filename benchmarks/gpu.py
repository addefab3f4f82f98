"""GPU throughput of the pipeline's own training and prediction code, in one table.

    python benchmarks/gpu.py                      # training + prediction (+ DDP on 2+ GPUs), ~2 min on an H200
    python benchmarks/gpu.py --recipe             # also the default DRIVE recipe's wall time (dvc repro)
    python benchmarks/gpu.py --device cpu --smoke # every measurement at toy sizes on the CPU (tests the script)

What is measured, with the network of ``conf/dataset/drive.yaml`` over ``params.yaml`` (the
default DRIVE recipe's U-Net):

* training patches/s through :class:`vesselseg.training.loop.Trainer` (its own
  ``train_step``: autocast, GradScaler, channels_last, optimizer step), for fp32, AMP
  and AMP + channels_last, at batch sizes doubling until the GPU runs out of memory
  (or ``--max-batch``);
* prediction images/s through :func:`vesselseg.inference.predict.predict_image` at the
  DRIVE (584x565, one whole-image pass as the DRIVE config predicts) and HRF
  (2336x3504, ``predict.window`` windows) sizes, fp32 and AMP + channels_last;
* with two or more GPUs, training patches/s under DDP on two GPUs (``torchrun``, the
  same Trainer wrapped in DistributedDataParallel) against one;
* with ``--recipe``, the wall time of ``dvc repro`` of the default DRIVE recipe in a
  scratch copy of the project (needs DRIVE at ``--drive``).

On a machine without CUDA it prints ``no CUDA device found`` and exits 0, so it is
safe in any CI.  Numbers are medians of timed windows after warm-up steps, with
``torch.cuda.synchronize`` around each window.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))  # tools/ (test and benchmark support)
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from common import header, median, print_table  # noqa: E402

from tools import scratch  # noqa: E402
from vesselseg.families import network_config  # noqa: E402
from vesselseg.params import Params  # noqa: E402

DRIVE_SIZE = (584, 565)
HRF_SIZE = (2336, 3504)
MODES = {  # name -> (train.amp, channels_last)
    "fp32": (False, False),
    "AMP": (True, False),
    "AMP+channels_last": (True, True),
}


# --smoke: a network and patches small enough that every code path runs in seconds on a CPU
SMOKE = {"model": {"depth": 2, "base_channels": 4}, "patches": {"size": 16}}


def recipe_params(smoke: bool = False) -> Params:
    """The default DRIVE recipe, as ``dvc exp run -S dataset=drive`` composes it."""
    from vesselseg.recipes import compose

    merged = compose(["dataset=drive"], root=ROOT)
    return Params.model_validate(scratch.merge(merged, SMOKE) if smoke else merged)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_rate(
    step: Callable[[], object], items: int, device: torch.device, *, warmup: int, seconds: float, windows: int = 3
) -> float:
    """Items per second of ``step`` (each call handles ``items``): the median of ``windows``
    timed windows, each at least ``seconds / windows`` long, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    sync(device)
    rates = []
    for _ in range(windows):
        n, t0 = 0, time.perf_counter()
        while True:
            step()
            n += 1
            sync(device)
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds / windows:
                break
        rates.append(n * items / elapsed)
    return median(rates)


def make_trainer(
    params: Params, device: torch.device, *, amp: bool, channels_last: bool, batch: int, world: Any = None
) -> Any:
    """A Trainer exactly as ``fit`` builds one, for the recipe's network and loss."""
    from vesselseg.losses import build_loss
    from vesselseg.models import build_model
    from vesselseg.training.distributed import World
    from vesselseg.training.loop import Trainer

    # no lr schedule: a throughput run takes any number of steps, and a one-cycle schedule
    # (the DRIVE recipe's) refuses to step past epochs x steps; the step's cost is the same
    train = params.train.model_copy(
        update={"amp": amp, "channels_last": channels_last, "batch_size": batch, "scheduler": "none"}
    )
    config = network_config(params.model)
    torch.manual_seed(0)
    return Trainer(
        model=build_model(config),
        model_config=config,
        loss_fn=build_loss(train.loss, dice_weight=train.dice_weight),
        params=train,
        seed=0,
        device=device,
        world=world or World(),
        steps_per_epoch=1,
    )


def patch_batch(batch: int, size: int, channels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random patches, labels and FOV masks as the batch loader hands them over (CPU, pinned on CUDA hosts)."""
    g = torch.Generator().manual_seed(batch)
    x = torch.rand(batch, channels, size, size, generator=g)
    y = (torch.rand(batch, 1, size, size, generator=g) > 0.9).float()
    m = torch.ones(batch, 1, size, size)
    if torch.cuda.is_available():
        x, y, m = x.pin_memory(), y.pin_memory(), m.pin_memory()
    return x, y, m


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def bench_training(params: Params, device: torch.device, args: argparse.Namespace) -> list[list[Any]]:
    size, channels = params.patches.size, params.model.in_channels
    rows: list[list[Any]] = []
    for mode, (amp, channels_last) in MODES.items():
        batch = args.min_batch
        while batch <= args.max_batch:
            try:
                trainer = make_trainer(params, device, amp=amp, channels_last=channels_last, batch=batch)
                x, y, m = patch_batch(batch, size, channels)
                rate = timed_rate(functools.partial(trainer.train_step, x, y, m), batch, device, warmup=args.warmup,
                                  seconds=args.seconds, windows=args.windows)  # fmt: skip
            except RuntimeError as err:
                if not is_oom(err):
                    raise
                rows.append(["train", mode, batch, "out of memory", "patches/s"])
                break
            finally:
                trainer = x = y = m = None  # type: ignore[assignment]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            unit = "patches/s"
            if device.type == "cuda":
                unit += f" (peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB)"
                torch.cuda.reset_peak_memory_stats(device)
            rows.append(["train", mode, batch, round(rate, 1), unit])
            batch *= 2
    return rows


def bench_prediction(params: Params, device: torch.device, args: argparse.Namespace) -> list[list[Any]]:
    from vesselseg.device import to_channels_last
    from vesselseg.inference.predict import predict_image
    from vesselseg.models import build_model

    scale = 16 if args.smoke else 1
    sizes = {  # name -> ((H, W), predict.window)
        "DRIVE": ((DRIVE_SIZE[0] // scale, DRIVE_SIZE[1] // scale), params.predict.window),  # DRIVE config: None
        "HRF": ((HRF_SIZE[0] // scale, HRF_SIZE[1] // scale), 1024 // scale),  # predict.window's default
    }
    rows: list[list[Any]] = []
    for mode in ("fp32", "AMP+channels_last"):
        amp, channels_last = MODES[mode]
        torch.manual_seed(0)
        model = build_model(network_config(params.model)).to(device).eval()
        if channels_last:
            channels_last = to_channels_last(model)
        for name, ((h, w), window) in sizes.items():
            rng = np.random.default_rng(0)
            shape = (h, w) if params.model.in_channels == 1 else (h, w, params.model.in_channels)
            image = rng.integers(0, 256, shape, dtype=np.uint8)

            run = functools.partial(predict_image, model, image, window=window, overlap=params.predict.overlap,
                                    weighting=params.predict.weighting, batch_size=params.predict.batch_size,
                                    device=device, amp=amp, channels_last=channels_last)  # fmt: skip

            try:
                rate = timed_rate(
                    run, 1, device, warmup=min(2, args.warmup), seconds=args.seconds, windows=args.windows
                )
            except RuntimeError as err:
                if not is_oom(err):
                    raise
                rows.append(["predict", mode, f"{name} {w}x{h}", "out of memory", "images/s"])
                continue
            where = "whole image" if window is None else f"window {window}"
            rows.append(["predict", mode, f"{name} {w}x{h}", round(rate, 2), f"images/s ({where})"])
    return rows


def bench_ddp(args: argparse.Namespace, single_rate: float | None) -> list[list[Any]]:
    """Two processes under torchrun, one GPU each, the recipe's Trainer in DDP."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ddp.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--ddp-worker", str(out), "--ddp-batch", str(args.ddp_batch), "--ddp-steps", str(args.ddp_steps),
               "--device", args.device] + (["--smoke"] if args.smoke else [])  # fmt: skip
        code, text = run_group(cmd, timeout=args.ddp_timeout)
        if code != 0 or not out.is_file():
            tail = text.strip().splitlines()[-3:]
            return [["train DDP", "2 processes", args.ddp_batch, "failed", f"exit {code}: " + " | ".join(tail)]]
        rate = json.loads(out.read_text())["patches_per_s"]
    note = f"patches/s, both together ({rate / single_rate:.2f}x one)" if single_rate else "patches/s, both together"
    return [["train DDP", "AMP+channels_last, 2 processes", f"{args.ddp_batch} each", round(rate, 1), note]]


def run_group(cmd: list[str], timeout: float) -> tuple[int | None, str]:
    """Run ``cmd`` in its own process group; on timeout end the whole group (torchrun and
    its workers), so a hung collective never outlives the benchmark."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=timeout)
        return proc.returncode, text
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        text, _ = proc.communicate()
        return None, f"{text}\ntimed out after {timeout:.0f} s"


def ddp_worker(args: argparse.Namespace) -> None:
    from vesselseg.training.distributed import barrier, init_world, shutdown

    device_type = "cuda" if args.device == "cuda" else "cpu"
    world = init_world(device_type)
    device = torch.device("cuda", world.local_rank) if device_type == "cuda" else torch.device("cpu")
    params = recipe_params(args.smoke)
    trainer = make_trainer(params, device, amp=True, channels_last=True, batch=args.ddp_batch, world=world)
    x, y, m = patch_batch(args.ddp_batch, params.patches.size, params.model.in_channels)
    # Every rank must take the same number of steps (each backward all-reduces with the
    # others), so DDP is timed over a fixed step count, not a time window.
    for _ in range(args.warmup):
        trainer.train_step(x, y, m)
    sync(device)
    barrier(world)
    t0 = time.perf_counter()
    for _ in range(args.ddp_steps):
        trainer.train_step(x, y, m)
    sync(device)
    elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)  # the slowest rank sets the pace
    if world.is_main:
        rate = world.size * args.ddp_batch * args.ddp_steps / float(elapsed.item())
        Path(args.ddp_worker).write_text(json.dumps({"patches_per_s": rate, "world": world.size}))
    shutdown(world)


def bench_recipe(args: argparse.Namespace) -> list[list[Any]]:
    """``dvc repro`` of conf/dataset/drive.yaml in a scratch project: the wall time a user waits."""
    source = Path(args.drive).resolve()
    if not source.is_dir():
        return [["recipe", "conf/dataset/drive.yaml", "", "skipped", f"DRIVE not found at {source} (--drive)"]]
    overlay = yaml.safe_load((ROOT / "conf" / "dataset" / "drive.yaml").read_text())
    overlay["data"]["source"] = str(source)
    overlay.setdefault("train", {})["device"] = args.device
    env = scratch.scratch_env()
    work = Path(tempfile.mkdtemp(prefix="vesselseg-gpu-recipe-"))
    try:
        project = scratch.make_project(work / "drive", overlay, root=ROOT, env=env)
        t0 = time.monotonic()
        scratch.run(["dvc", "repro"], project, env)
        wall = time.monotonic() - t0
        train = json.loads((project / "reports/train/metrics.json").read_text())
        test = json.loads((project / "reports/metrics.json").read_text()).get("test", {})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    note = (f"s wall (train {train.get('train_seconds')} s, {train.get('epochs_run')} epochs; "
            f"test F1 {test.get('dice', float('nan')):.4f}, AUC {test.get('auc_roc', float('nan')):.4f})")  # fmt: skip
    return [["recipe", "conf/dataset/drive.yaml", "dvc repro", round(wall, 1), note]]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu only with --smoke: exercise the script without a GPU")  # fmt: skip
    ap.add_argument("--smoke", action="store_true", help="toy sizes and short windows: checks the script, not the GPU")
    ap.add_argument("--seconds", type=float, default=3.0, help="timed seconds per measurement (default 3)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps before each measurement (cuDNN autotuning)")
    ap.add_argument("--min-batch", type=int, default=32)
    ap.add_argument(
        "--max-batch", type=int, default=8192, help="largest training batch tried (doubling from --min-batch)"
    )
    ap.add_argument("--ddp-batch", type=int, default=512, help="training batch per GPU under DDP")
    ap.add_argument("--ddp-steps", type=int, default=100, help="timed training steps under DDP")
    ap.add_argument("--ddp-timeout", type=float, default=300, help="seconds before the DDP run is ended")
    ap.add_argument("--no-ddp", action="store_true", help="skip the two-GPU DDP run even with two GPUs")
    ap.add_argument(
        "--ddp", action="store_true", help="run the DDP measurement even with fewer than two GPUs (CPU: gloo)"
    )
    ap.add_argument("--recipe", action="store_true", help="also time dvc repro of the default DRIVE recipe")
    ap.add_argument(
        "--drive", default=str(ROOT.parent / "shared" / "datasets" / "DRIVE"), help="DRIVE folder for --recipe"
    )
    ap.add_argument(
        "--json", metavar="PATH", help="also write the table as JSON (gpu, rows of measure/setting/size/value/unit)"
    )
    ap.add_argument("--ddp-worker", metavar="OUT_JSON", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke:
        args.seconds, args.warmup, args.windows = min(args.seconds, 0.1), 1, 1
        args.min_batch, args.max_batch, args.ddp_batch, args.ddp_steps = 4, 4, 4, 3
    else:
        args.windows = 3
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.ddp_worker:
        ddp_worker(args)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"no CUDA device found (torch {torch.__version__}); nothing to measure. "
              "Run this on a machine with a GPU, or add --device cpu --smoke to check the script.")  # fmt: skip
        return 0
    if args.device == "cpu" and not args.smoke:
        print("--device cpu is for --smoke runs only: CPU numbers are benchmarks/bench_*.py's job")
        return 2
    device = torch.device(args.device)
    n_gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = f"{props.name} ({props.total_memory / 2**30:.0f} GiB), {n_gpus} visible"
        facts = {
            "GPU": gpu,
            "torch": torch.__version__,
            "CUDA": torch.version.cuda,
            "cuDNN": torch.backends.cudnn.version(),
        }
        torch.backends.cudnn.benchmark = True  # as setup_runtime does for training
    else:
        gpu = "none (CPU smoke run: the numbers mean nothing)"
        facts = {"GPU": gpu, "torch": torch.__version__}
    params = recipe_params(args.smoke)
    net = network_config(params.model)
    header("GPU throughput of vesselseg's Trainer and predict_image", **facts,
           network=f"{net['name']} depth {net['depth']} base {net['base_channels']} (conf/dataset/drive.yaml{' shrunk by --smoke' if args.smoke else ''}), "
                   f"{params.patches.size}-px patches, loss {params.train.loss}")  # fmt: skip

    rows = bench_training(params, device, args)
    rows += bench_prediction(params, device, args)
    if (n_gpus >= 2 and not args.no_ddp) or args.ddp:
        one = [r[3] for r in rows if r[0] == "train" and r[1] == "AMP+channels_last" and r[2] == args.ddp_batch]
        rows += bench_ddp(args, one[0] if one and isinstance(one[0], float) else None)
    elif not args.no_ddp:
        rows.append(["train DDP", "2 GPUs", "", "skipped", f"{n_gpus} GPU(s) visible"])
    if args.recipe:
        rows += bench_recipe(args)
    columns = ["measure", "setting", "batch / size", "value", "unit"]
    print(f"\nGPU: {gpu}")
    print_table(columns, rows, floatfmt=".1f")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"gpu": gpu, "rows": [dict(zip(columns, r, strict=True)) for r in rows]}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
