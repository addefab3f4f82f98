"""Small builders shared by tests (not fixtures, so subprocess tests can use them too)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from vesselseg.prepared import write_item

if TYPE_CHECKING:
    import torch

    from vesselseg.losses import LossName
    from vesselseg.params import TrainParams
    from vesselseg.training.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"


def load_benchmark(script: str, name: str) -> ModuleType:
    """Import ``benchmarks/<script>`` (not a package) as module ``name``."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / script)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def line_scene(seed: int, size: int = 48, fov_all: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A noisy image with a few bright random lines: easy to learn, cheap to train."""
    import cv2

    rng = np.random.default_rng(seed)
    label = np.zeros((size, size), dtype=np.uint8)
    for _ in range(3):
        p0 = tuple(int(v) for v in rng.integers(0, size, 2))
        p1 = tuple(int(v) for v in rng.integers(0, size, 2))
        cv2.line(label, p0, p1, 1, int(rng.integers(1, 4)))
    label = label.astype(bool)
    noise = rng.normal(0, 25, (size, size))
    image = np.clip(60 + 120 * label + noise, 0, 255).astype(np.uint8)
    fov = np.ones((size, size), dtype=bool)
    if not fov_all:
        yy, xx = np.mgrid[:size, :size]
        fov = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= (size / 2) ** 2
    return image, label, fov


def make_prepared(
    root: Path, n_train: int = 4, n_val: int = 2, n_test: int = 2, size: int = 48, fov_all: bool = False
) -> Path:
    ids = {
        "train": [f"tr{k}" for k in range(n_train)],
        "val": [f"va{k}" for k in range(n_val)],
        "test": [f"te{k}" for k in range(n_test)],
    }
    seed = 0
    for split_ids in ids.values():
        for i in split_ids:
            write_item(root, i, *line_scene(seed, size, fov_all))
            seed += 1
    (root / "split.json").write_text(json.dumps({"dataset": "test", **ids}))
    return root


def fit_family(
    out: Path,
    prepared: Path,
    patches: Path | None = None,
    *,
    family: object | None = None,
    seed: int = 0,
    **sections: object,
) -> dict:
    """Train through the family registry as the train stage does; ``sections`` are params sections.

    Writes ``out/{model.pt, ckpt.pt, history.csv, metrics.json}``; returns the metrics.
    """
    from vesselseg.families import get_family
    from vesselseg.families.base import TrainJob
    from vesselseg.params import parse_params

    params = parse_params({"seed": seed, **sections})
    job = TrainJob(
        params=params,
        prepared_dir=prepared,
        patch_dir=patches or out / "no-patches",
        model_path=out / "model.pt",
        checkpoint_path=out / "ckpt.pt",
        history_path=out / "history.csv",
        metrics_path=out / "metrics.json",
    )
    return (family or get_family(params.model.name)).fit(job)  # type: ignore[attr-defined, no-any-return]


def cpu_trainer(
    net: torch.nn.Module, config: dict, params: TrainParams, loss: LossName = "bce", steps_per_epoch: int = 1
) -> Trainer:
    """A single-process CPU :class:`~vesselseg.training.loop.Trainer` for step-level tests."""
    import torch

    from vesselseg.losses import build_loss
    from vesselseg.training.distributed import World
    from vesselseg.training.loop import Trainer

    return Trainer(
        model=net,
        model_config=config,
        loss_fn=build_loss(loss),
        params=params,
        seed=0,
        device=torch.device("cpu"),
        world=World(),
        steps_per_epoch=steps_per_epoch,
    )
