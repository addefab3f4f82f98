"""Benchmark: onnxruntime against torch for ``vesselseg segment``, at DRIVE and HRF sizes.

Question (issue 13, §2): is onnxruntime faster than PyTorch for one image, and where?
``vesselseg segment --backend auto`` must use onnxruntime only where it wins; this
script measures both side by side in one run and checks that the rule coded in
:func:`vesselseg.segment.auto_backend` agrees with what it measured.

What is timed is the product's own predictor, :func:`vesselseg.segment.load_predictor`
(``--backend torch`` and ``--backend onnx``: the same sliding-window stitching with the
model's window settings, 1024-px windows, so DRIVE is one forward pass and HRF is
tiled), on a prepared uint8 image, with the DRIVE config's U-Net (depth 3, base 16;
freshly initialised: weights do not change the cost).  The two backends run
round-robin (common.interleaved), and the ratio is the median of per-round ratios, so
load drift on a shared machine hits both alike.  Both use every core (torch's and
onnxruntime's default thread pools).

Usage::

    python benchmarks/bench_onnx.py            # DRIVE 584x565 and HRF 2336x3504, 3 rounds
    python benchmarks/bench_onnx.py --quick    # 1 round
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Checks, header, interleaved, median, print_table

from vesselseg.families import network_config
from vesselseg.models import build_model, save_model
from vesselseg.params import DataParams, ModelParams, PrepareParams
from vesselseg.preprocess.spec import preprocessing_spec
from vesselseg.segment import auto_backend, load_predictor

SIZES = {"DRIVE": (584, 565), "HRF": (2336, 3504)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one round instead of three")
    args = ap.parse_args(argv)
    import onnxruntime
    import torch

    rounds = 1 if args.quick else 3
    header(
        "onnxruntime vs torch per image (vesselseg segment's predictor)",
        torch=torch.__version__,
        onnxruntime=onnxruntime.__version__,
        torch_threads=torch.get_num_threads(),
        rounds=rounds,
    )
    model_params = ModelParams(depth=3, base_channels=16, dropout=0.0)
    torch.manual_seed(0)
    net = build_model(network_config(model_params))
    spec = preprocessing_spec(DataParams(dataset="drive"), PrepareParams(), model_params, 0.5)
    rows = []
    checks = Checks()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        save_model(path, net, network_config(model_params), extra={"preprocessing": spec})
        predictors = {
            "torch": load_predictor(path, device="cpu", backend="torch"),
            "onnx": load_predictor(path, device="cpu", backend="onnx"),
        }
        rng = np.random.default_rng(0)
        for name, (h, w) in SIZES.items():
            image = rng.integers(0, 256, (h, w), dtype=np.uint8)
            diff = float(np.abs(predictors["torch"](image) - predictors["onnx"](image)).max())  # also the warm-up
            times = interleaved({k: (lambda p=p, im=image: p(im)) for k, p in predictors.items()}, repeats=rounds)
            ratio = median([o / t for o, t in zip(times["onnx"], times["torch"], strict=True)])
            rows.append([f"{name} {h}x{w}", median(times["torch"]), median(times["onnx"]), ratio, diff])
            faster = "onnx" if ratio < 1.0 else "torch"
            checks.flag(
                f"auto backend at {name}",
                auto_backend("torch", (h, w)) == faster,
                f"measured onnxruntime/torch = {ratio:.2f}, auto picks {auto_backend('torch', (h, w))}",
            )
            checks.check(f"max |onnx - torch| at {name}", diff, 1e-4, fmt=".1e")
    print_table(["image", "torch s", "onnxruntime s", "onnx/torch", "max diff"], rows)
    return checks.finish()


if __name__ == "__main__":
    sys.exit(main())
