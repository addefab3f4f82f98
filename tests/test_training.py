"""The training loop: it learns, resumes exactly after SIGKILL, and DDP matches one process."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.helpers import ROOT, cpu_trainer, fit_family, make_prepared
from vesselseg.patches import run_patches

torch.set_num_threads(1)

MODEL = {"depth": 2, "base_channels": 4, "batch_norm": True, "dropout": 0.1}


def _patches(prepared: Path, out: Path, *, size: int, per_image: int, val_per_image: int) -> Path:
    """Foreground-weighted patches without augmentation, seed 0."""
    run_patches(
        prepared_dir=prepared,
        out_dir=out,
        size=size,
        per_image=per_image,
        val_per_image=val_per_image,
        sampling="foreground",
        foreground_fraction=0.5,
        augment_copies=0,
        rotate_limit=0,
        scale_limit=0,
        seed=0,
    )
    return out


def _data(tmp: Path, fov_all: bool = False) -> tuple[Path, Path]:
    prepared = make_prepared(tmp / "prepared", fov_all=fov_all)
    patches = _patches(prepared, tmp / "patches", size=16, per_image=24, val_per_image=8)
    return prepared, patches


def _fit(tmp: Path, prepared: Path, patches: Path, tag: str, model=MODEL, **train_kw):
    train = {"epochs": 3, "batch_size": 8, "lr": 3e-3, "threads": 1, "patience": 50, **train_kw}
    out = tmp / tag
    metrics = fit_family(out, prepared, patches, model=model, train=train)
    return out, metrics


def test_fit_learns_and_writes_outputs(tmp_path: Path) -> None:
    prepared, patches = _data(tmp_path)
    out, metrics = _fit(tmp_path, prepared, patches, "a", epochs=6)
    hist = pd.read_csv(out / "history.csv")
    assert list(hist.columns) == ["epoch", "train_loss", "val_loss", "val_dice", "val_iou", "lr", "seconds"]
    assert len(hist) == 6 and hist.train_loss.iloc[-1] < hist.train_loss.iloc[0]
    assert metrics["best_epoch"] == int(hist.val_dice.idxmax()) + 1
    assert json.loads((out / "metrics.json").read_text())["epochs_run"] == 6
    assert (out / "model.pt").is_file() and not (out / "ckpt.pt").exists()


def test_early_stopping(tmp_path: Path) -> None:
    prepared, patches = _data(tmp_path)
    # lr so small nothing improves after the first epoch's score
    _, metrics = _fit(tmp_path, prepared, patches, "s", epochs=10, patience=2, lr=1e-9)
    assert metrics["epochs_run"] <= metrics["best_epoch"] + 2


def test_same_seed_same_model(tmp_path: Path) -> None:
    prepared, patches = _data(tmp_path)
    a, _ = _fit(tmp_path, prepared, patches, "a")
    b, _ = _fit(tmp_path, prepared, patches, "b")
    assert (a / "model.pt").read_bytes() == (b / "model.pt").read_bytes()


RESUME_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from pathlib import Path
from tests.test_training import _fit
tmp, tag = Path(sys.argv[1]), sys.argv[2]
_fit(tmp, tmp / "prepared", tmp / "patches", tag, epochs=8)
"""


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path: Path) -> None:
    prepared, patches = _data(tmp_path)
    ref, _ = _fit(tmp_path, prepared, patches, "ref", epochs=8)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", RESUME_SCRIPT, str(tmp_path), "killed"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = tmp_path / "killed" / "ckpt.pt"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be killed: " + proc.stderr.read().decode()[-500:]
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not (tmp_path / "killed" / "model.pt").exists()
    epoch_killed = torch.load(ckpt, weights_only=False)["epoch"]
    assert 1 <= epoch_killed < 8
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    a = torch.load(ref / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "killed" / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha = pd.read_csv(ref / "history.csv").drop(columns="seconds")
    hb = pd.read_csv(tmp_path / "killed" / "history.csv").drop(columns="seconds")
    pd.testing.assert_frame_equal(ha, hb)


DDP_SCRIPT = """
import os, sys, torch
torch.set_num_threads(1)
from pathlib import Path
from tests.test_training import _fit, MODEL_DDP
tmp = Path(sys.argv[1])
_fit(tmp, tmp / "prepared", tmp / "patches", "ddp", model=MODEL_DDP, loss="bce", flip=False, rotate90=False)
"""
MODEL_DDP = {"depth": 2, "base_channels": 4, "batch_norm": False, "dropout": 0.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(240)
@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    prepared, patches = _data(tmp_path, fov_all=True)
    single, _ = _fit(tmp_path, prepared, patches, "single", model=MODEL_DDP, loss="bce", flip=False, rotate90=False)
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "WORLD_SIZE": "2",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", DDP_SCRIPT, str(tmp_path)], cwd=ROOT, env=env, stderr=subprocess.PIPE
            )
        )
    for p in procs:
        _, err = p.communicate(timeout=200)
        assert p.returncode == 0, err.decode()[-2000:]
    hs = pd.read_csv(single / "history.csv")
    hd = pd.read_csv(tmp_path / "ddp" / "history.csv")
    assert len(hs) == len(hd) == 3
    for col in ("train_loss", "val_loss", "val_dice"):
        assert hs[col].tolist() == pytest.approx(hd[col].tolist(), rel=1e-4, abs=1e-5), col


def test_valid_padding_unet_trains_on_cropped_targets(tmp_path: Path) -> None:
    """unet-valid: the output is smaller than the patch; labels are centre-cropped to it."""
    prepared = make_prepared(tmp_path / "prepared")
    patches = _patches(prepared, tmp_path / "patches", size=44, per_image=8, val_per_image=4)
    model = {"depth": 1, "base_channels": 4, "padding": "valid", "upsampling": "transpose"}
    out, metrics = _fit(tmp_path, prepared, patches, "valid", model=model, loss="bce", epochs=2)
    assert (out / "model.pt").is_file() and metrics["epochs_run"] == 2
    assert 0.0 <= metrics["best_val_dice"] <= 1.0


def test_wnet_trains_with_every_stage_supervised(tmp_path: Path) -> None:
    """model.stacks 2: the loss is the mean of both stages' losses, and the W-Net learns."""
    from vesselseg.models import load_model
    from vesselseg.params import TrainParams

    prepared, patches = _data(tmp_path)
    out, metrics = _fit(tmp_path, prepared, patches, "wnet", model={**MODEL, "stacks": 2}, epochs=4)
    hist = pd.read_csv(out / "history.csv")
    assert hist.train_loss.iloc[-1] < hist.train_loss.iloc[0] and metrics["epochs_run"] == 4
    net, meta = load_model(out / "model.pt")
    assert meta["config"]["stacks"] == 2 and net.refine is not None
    trainer = cpu_trainer(net, meta["config"], TrainParams(amp=False, channels_last=False), steps_per_epoch=1)
    x, y, m = _batch(1)
    net.train()
    with torch.no_grad():
        stages = net(x)
        assert isinstance(stages, tuple) and len(stages) == 2
        per_stage = [float(trainer._loss(s, y, m)) for s in stages]
        assert float(trainer._loss(stages, y, m)) == pytest.approx(sum(per_stage) / 2)


def test_center_crop_to() -> None:
    from vesselseg.training.loop import center_crop_to

    t = torch.arange(36.0).reshape(1, 1, 6, 6)
    out = center_crop_to(t, torch.zeros(1, 1, 2, 2))
    assert out.flatten().tolist() == [14.0, 15.0, 20.0, 21.0]


def _ema_trainer(ema: float, bn_batches: int = 2):
    from vesselseg.models import build_model
    from vesselseg.params import TrainParams

    torch.manual_seed(0)
    config = {"name": "unet", "in_channels": 1, "out_channels": 1, **MODEL, "dropout": 0.0}
    params = TrainParams(ema=ema, ema_bn_batches=bn_batches, lr=1e-2, amp=False, channels_last=False)
    return cpu_trainer(build_model(config), config, params, steps_per_epoch=4)


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 1, 16, 16, generator=g)
    return x, (x > 0.6).float(), torch.ones_like(x)


class _Batches:
    """``epoch(e)`` yields fixed batches and records how many were drawn."""

    def __init__(self, seeds: list[int]) -> None:
        self.seeds, self.drawn = seeds, 0

    def epoch(self, epoch: int):
        for s in self.seeds:
            self.drawn += 1
            yield _batch(s)


def _params(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.named_parameters()}


def _bn_stats(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items() if "running_" in k}


def test_ema_weights_are_the_moving_average_and_are_what_validation_sees() -> None:
    """train.ema 0.5: the first step copies the weights, the next averages half and half;
    inside ``selection_weights`` the model holds that average with BatchNorm statistics
    re-estimated on ``ema_bn_batches`` training batches (the cumulative mean of what the
    averaged net sees), and after it the live weights and statistics again."""
    from torch.optim.swa_utils import update_bn

    t = _ema_trainer(0.5, bn_batches=2)
    t.train_step(*_batch(1))
    w1 = _params(t.raw_model)
    t.train_step(*_batch(2))
    w2, live_bn = _params(t.raw_model), _bn_stats(t.raw_model)
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)
    batches = _Batches([7, 8, 9])
    with t.selection_weights(batches, epoch=3):
        seen, seen_bn = _params(t.raw_model), _bn_stats(t.raw_model)
    assert batches.drawn == 2
    for k in w1:
        torch.testing.assert_close(seen[k], 0.5 * w1[k] + 0.5 * w2[k], rtol=1e-6, atol=1e-7)
    ref = copy.deepcopy(t.raw_model)
    ref.load_state_dict(seen, strict=False)
    update_bn([_batch(7)[0], _batch(8)[0]], ref)
    assert all(torch.allclose(seen_bn[k], v) for k, v in _bn_stats(ref).items())
    assert any(not torch.allclose(seen_bn[k], live_bn[k]) for k in live_bn)
    assert all(torch.equal(v, w2[k]) for k, v in _params(t.raw_model).items())
    assert all(torch.equal(v, live_bn[k]) for k, v in _bn_stats(t.raw_model).items())
    off = _ema_trainer(0.0)
    off.train_step(*_batch(1))
    with off.selection_weights(batches, epoch=3):
        assert all(torch.equal(v, w1[k]) for k, v in _params(off.raw_model).items())
    assert batches.drawn == 2


def test_ema_state_resumes_from_the_checkpoint(tmp_path: Path) -> None:
    """The checkpoint carries the average: a trainer restored after two steps continues
    to the same averaged weights as one that never stopped."""
    from vesselseg.training import checkpoint as ckpt

    a = _ema_trainer(0.9)
    for s in (1, 2):
        a.train_step(*_batch(s))
    ckpt.save_checkpoint(tmp_path / "ckpt.pt", a.state(1, "fp"))
    b = _ema_trainer(0.9)
    b.restore(ckpt.load_checkpoint(tmp_path / "ckpt.pt", "fp"))
    for t in (a, b):
        t.train_step(*_batch(3))
    with a.selection_weights(_Batches([4]), epoch=2):
        wa = _params(a.raw_model)
    with b.selection_weights(_Batches([4]), epoch=2):
        wb = _params(b.raw_model)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_fit_with_ema_saves_the_averaged_weights_it_validated(tmp_path: Path) -> None:
    """End to end: the saved model is the averaged one, picked by its own validation
    score, and it is a working net (the score is not collapsed by stale statistics)."""
    prepared, patches = _data(tmp_path)
    live, live_metrics = _fit(tmp_path, prepared, patches, "live", epochs=4)
    avg, metrics = _fit(tmp_path, prepared, patches, "ema", epochs=4, ema=0.8)
    a = torch.load(live / "model.pt", weights_only=True)
    b = torch.load(avg / "model.pt", weights_only=True)
    assert any(not torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    hist = pd.read_csv(avg / "history.csv")
    assert metrics["best_epoch"] == int(hist.val_dice.idxmax()) + 1
    assert metrics["best_val_dice"] == pytest.approx(hist.val_dice.max(), abs=1e-6)
    assert metrics["best_val_dice"] > 0.8 * live_metrics["best_val_dice"], (metrics, live_metrics)
