"""The training loop: it learns, resumes exactly after SIGKILL, and DDP matches one process."""

from __future__ import annotations

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

from tests.helpers import ROOT, fit_family, make_prepared
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


def test_center_crop_to() -> None:
    from vesselseg.training.loop import center_crop_to

    t = torch.arange(36.0).reshape(1, 1, 6, 6)
    out = center_crop_to(t, torch.zeros(1, 1, 2, 2))
    assert out.flatten().tolist() == [14.0, 15.0, 20.0, 21.0]
