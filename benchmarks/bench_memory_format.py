"""Benchmark: channels_last (NHWC) against NCHW conv weights, training and prediction.

Target (issue 5, item 5: "channels_last where it helps"): ``train.channels_last`` and
``predict.channels_last`` ship as ``true`` on every device, so every shipped
configuration that runs a 2D net must be at least as fast with them as without:
time with channels_last / time with NCHW <= 1.0, for one training step and for one
prediction, in every row.  A row above 1.0 means the setting does not help that
model, and its recipe should turn it off.

What is timed is the product's own code: ``Trainer.train_step`` (forward, loss,
backward, optimizer step) on a batch of the config's patch size and batch size, and
``predict_image`` on a DRIVE-size image (584 x 565) with the config's predict params
(the patch classifier: ``predict_probability_map`` on a 128 x 128 crop).  The two
settings run back to back in each round; each ratio is the median of the per-round
ratios, so load drift on a shared machine hits both alike.  The models are the
configs' own (depth, width, BN, dropout, upsampling), freshly initialised: the
weights' values do not change the cost.

Usage::

    python benchmarks/bench_memory_format.py            # every shipped config and recipe with a 2D net
    python benchmarks/bench_memory_format.py --quick    # params.yaml and conf/dataset/drive.yaml only, 3 rounds
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Checks, geomean, header, interleaved, median, print_table

from vesselseg.device import set_threads, to_channels_last
from vesselseg.families import network_config
from vesselseg.families.resnet_patch import predict_probability_map
from vesselseg.inference.predict import predict_image
from vesselseg.losses import build_loss
from vesselseg.models import build_model
from vesselseg.params import Params, parse_params
from vesselseg.recipes import compose, list_choices
from vesselseg.registry import info
from vesselseg.training.distributed import World
from vesselseg.training.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.0
DRIVE_SIZE = (584, 565)
QUICK = ("params.yaml", "conf/dataset/drive.yaml")
TWO_D = ("unet", "resnet_patch")  # IPN is 3D (no channels_last); KNN and vesselness have no net


def shipped_configs(quick: bool) -> list[tuple[str, Params]]:
    """(name, params) of the default composition, each conf/dataset and each conf/recipe, as DVC composes them."""
    choices = [("params.yaml", [])]
    choices += [(f"conf/dataset/{c.name}.yaml", [f"dataset={c.name}"]) for c in list_choices("dataset", ROOT)]
    choices += [
        (f"conf/recipe/{c.name}.yaml", [f"recipe={c.name}"])
        for c in list_choices("recipe", ROOT)
        if c.name != "default"
    ]
    out, seen = [], set()
    for name, overrides in choices:
        if quick and name not in QUICK:
            continue
        params = parse_params(compose(overrides, root=ROOT), name)
        key = repr((params.model, params.patches.size, params.train.batch_size, params.predict))  # same work: time once
        if params.model.name in TWO_D and key not in seen:
            seen.add(key)
            out.append((name, params))
    return out


def train_step_fns(params: Params, seed: int) -> dict[str, Any]:
    """One real ``Trainer.train_step`` per call, for NCHW and channels_last, same initial weights."""
    cfg = network_config(params.model)
    size, batch = params.patches.size, params.train.batch_size
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.random((batch, cfg.get("in_channels", 1), size, size), dtype=np.float32))
    y = torch.from_numpy((rng.random((batch, 1, size, size)) > 0.85).astype(np.float32))
    m = torch.ones_like(y)
    fam = info(cfg["name"])
    if fam.target == "centre_pixel":  # a centre-pixel classifier: one label per patch
        y, m = y[:, :, size // 2, size // 2].reshape(batch, 1), torch.ones(batch, 1)
    torch.manual_seed(seed)
    net = build_model(cfg)
    loss = params.train.loss if fam.losses is None or params.train.loss in fam.losses else fam.losses[0]
    fns = {}
    for label, cl in (("nchw", False), ("channels_last", True)):
        tp = params.train.model_copy(update={"channels_last": cl, "device": "cpu"})
        trainer = Trainer(
            model=copy.deepcopy(net),
            model_config=cfg,
            loss_fn=build_loss(loss, dice_weight=tp.dice_weight),
            params=tp,
            seed=seed,
            device=torch.device("cpu"),
            world=World(),
            steps_per_epoch=10_000,
        )
        trainer.model.train()
        fns[label] = lambda t=trainer: t.train_step(x, y, m)
    return fns


def predict_fns(params: Params, seed: int) -> dict[str, Any]:
    """One prediction per call, as the predict stage runs it, for NCHW and channels_last."""
    cfg = network_config(params.model)
    torch.manual_seed(seed)
    net = build_model(cfg).eval()
    rng = np.random.default_rng(seed)
    channels = cfg.get("in_channels", 1)
    shape = DRIVE_SIZE if channels == 1 else (*DRIVE_SIZE, channels)
    image = rng.integers(0, 256, size=shape, dtype=np.uint8)
    pp = params.predict
    fns = {}
    for label, cl in (("nchw", False), ("channels_last", True)):
        model = copy.deepcopy(net)
        used = cl and to_channels_last(model)
        if info(cfg["name"]).target == "centre_pixel":
            size = params.patches.size
            fns[label] = lambda m=model, u=used, im=image, s=size: predict_probability_map(
                m,
                im[:128, :128],
                patch_size=s,
                stride=max(1, (pp.window or s) // 8),
                batch_size=pp.batch_size,
                channels_last=u,
            )
        else:
            fns[label] = lambda m=model, u=used: predict_image(
                m,
                image,
                window=pp.window,
                overlap=pp.overlap,
                weighting=pp.weighting,
                batch_size=pp.batch_size,
                device="cpu",
                amp=False,
                channels_last=u,
            )
    return fns


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="rounds per row (each round runs both settings)")
    ap.add_argument("--steps", type=int, default=2, help="training steps per timed run")
    ap.add_argument("--quick", action="store_true", help="params.yaml and conf/dataset/drive.yaml only, 3 rounds")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats = 3
    configs = shipped_configs(args.quick)
    threads = set_threads(configs[0][1].train.threads)
    header(
        "channels_last vs NCHW: training step and prediction",
        threads=threads,
        timing=f"{args.repeats} rounds, both settings back to back in each, median of per-round ratios; "
        f"{args.steps} training steps per timed run, 1 warm-up",
    )

    rows, checks_rows = [], []
    for name, params in configs:
        cfg = network_config(params.model)
        tf = train_step_fns(params, params.seed)
        steps = args.steps
        t_train = interleaved(
            {k: (lambda f=f, n=steps: [f() for _ in range(n)]) for k, f in tf.items()}, args.repeats, warmup=1
        )
        t_pred = interleaved(predict_fns(params, params.seed), args.repeats, warmup=1)
        r_train = median([c / n for c, n in zip(t_train["channels_last"], t_train["nchw"], strict=True)])
        r_pred = median([c / n for c, n in zip(t_pred["channels_last"], t_pred["nchw"], strict=True)])
        shape = f" d{cfg['depth']} b{cfg['base_channels']}" if {"depth", "base_channels"} <= set(cfg) else ""
        model = f"{cfg['name']}{shape}"
        rows.append(
            [
                name,
                model,
                f"{params.train.batch_size}x{params.patches.size}px",
                1e3 * median(t_train["nchw"]) / steps,
                1e3 * median(t_train["channels_last"]) / steps,
                r_train,
                median(t_pred["nchw"]),
                median(t_pred["channels_last"]),
                r_pred,
            ]
        )
        checks_rows.append((name, r_train, r_pred))
        print(f"  {name}: train {r_train:.3f}, predict {r_pred:.3f}", flush=True)

    print()
    print_table(
        [
            "config",
            "model",
            "batch",
            "train ms (NCHW)",
            "train ms (CL)",
            "train CL/NCHW",
            "predict s (NCHW)",
            "predict s (CL)",
            "predict CL/NCHW",
        ],
        rows,
    )
    print()
    checks = Checks()
    for name, r_train, r_pred in checks_rows:
        checks.check(f"{name}: train step channels_last / NCHW", r_train, TARGET)
        checks.check(f"{name}: prediction channels_last / NCHW", r_pred, TARGET)
    Checks.note(
        f"geometric mean over {len(checks_rows)} configs: train {geomean([r[1] for r in checks_rows]):.3f}, "
        f"predict {geomean([r[2] for r in checks_rows]):.3f}"
    )
    return checks.finish()


if __name__ == "__main__":
    sys.exit(main())
