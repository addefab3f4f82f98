"""Disk full while writing predictions: one clear error, no partial file, old outputs kept.

The disk is simulated by replacing the ``open`` that :mod:`vesselseg.atomic` uses with
one whose files share a byte budget: once it is spent, a write stores what still fits
and raises ``OSError(ENOSPC)``, as a real full disk does (a short write, then the
error).  The budget is set from a measured full run, so the failure falls inside a
chosen split whatever the exact file sizes are.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.helpers import make_prepared
from vesselseg import atomic
from vesselseg.atomic import DiskFullError
from vesselseg.cli import main
from vesselseg.errors import DataError
from vesselseg.inference.predict import run_predict
from vesselseg.models import build_model, save_model
from vesselseg.params import PredictParams

UNET = {
    "name": "unet",
    "in_channels": 1,
    "depth": 1,
    "base_channels": 4,
    "batch_norm": True,
    "dropout": 0.0,
    "upsampling": "bilinear",
    "padding": "same",
    "input_norm": False,
    "out_channels": 1,
}
PREDICT = dict(
    predict=PredictParams(window=16, overlap=0.25, weighting="constant", batch_size=4, threshold=0.5),
    device="cpu",
    amp=False,
)


class _Disk:
    """A byte budget shared by every file opened for writing through it; None = unlimited."""

    def __init__(self, budget: int | None) -> None:
        self.budget = budget
        self.written: list[tuple[str, int]] = []  # (file name, bytes), in order

    def open(self, file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        fh = builtins.open(file, mode, *args, **kwargs)  # noqa: SIM115 - a stand-in for open(): the caller closes it
        if not any(c in mode for c in "wax+"):
            return fh
        return _LimitedFile(fh, self, str(file))


class _LimitedFile:
    def __init__(self, fh: Any, disk: _Disk, name: str) -> None:
        self._fh, self._disk, self._name = fh, disk, name

    def write(self, data: Any) -> int:
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        disk = self._disk
        if disk.budget is not None and n > disk.budget:
            fit = disk.budget
            raw = data.encode() if isinstance(data, str) else bytes(data)
            self._fh.write(raw[:fit] if "b" in self._fh.mode else raw[:fit].decode(errors="ignore"))
            self._fh.flush()
            disk.budget = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._name)
        if disk.budget is not None:
            disk.budget -= n
        disk.written.append((Path(self._name).name, n))
        return self._fh.write(data)

    def __getattr__(self, item: str) -> Any:
        return getattr(self._fh, item)

    def __enter__(self) -> _LimitedFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._fh.close()


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    torch.set_num_threads(1)
    make_prepared(tmp_path / "prepared", n_train=1, n_val=2, n_test=2)
    torch.manual_seed(0)
    save_model(tmp_path / "model.pt", build_model(UNET), UNET)
    return tmp_path


def _predict(root: Path, out: str = "predictions") -> dict[str, Any]:
    return run_predict(model_path=root / "model.pt", prepared_dir=root / "prepared", out_dir=root / out, **PREDICT)


def _bytes_until(disk: _Disk, split: str) -> tuple[int, int]:
    """Bytes written before the first file of ``split`` and through its last one."""
    names = [n for n, _ in disk.written]
    ids = {"val": ("va0", "va1"), "test": ("te0", "te1")}[split]
    idx = [i for i, n in enumerate(names) if any(f"-{i_}-" in n for i_ in ids)]
    sizes = [b for _, b in disk.written]
    return sum(sizes[: idx[0]]), sum(sizes[: idx[-1] + 1])


def _measure(root: Path, monkeypatch: pytest.MonkeyPatch) -> _Disk:
    disk = _Disk(None)
    monkeypatch.setattr(atomic, "open", disk.open, raising=False)
    _predict(root, out="measure")
    monkeypatch.undo()
    return disk


def _assert_no_partial(root: Path) -> None:
    leftovers = [p for p in root.rglob("*") if p.name.startswith((".tmp-", ".old-"))]
    assert not leftovers, leftovers
    for probs in root.glob("predictions/*/probs/*.npy"):
        arr = np.load(probs)  # a truncated .npy would fail here
        assert arr.dtype == np.float32 and arr.ndim == 2


def test_disk_full_in_the_first_split_fails_cleanly_and_keeps_previous_predictions(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _predict(workspace)
    previous = _tree(workspace / "predictions")
    assert len(previous) == 8  # 4 images x (probs, mask)
    disk = _measure(workspace, monkeypatch)
    start, end = _bytes_until(disk, "val")
    budget = (start + end) // 2  # runs out in the middle of the val split, mid-file
    monkeypatch.setattr(atomic, "open", _Disk(budget).open, raising=False)

    with pytest.raises(DataError) as err:
        _predict(workspace)

    msg = str(err.value)
    assert isinstance(err.value, DiskFullError)
    assert "no space left on device" in msg.lower() and "\n" not in msg
    assert "predictions/val/" in msg and ".tmp-" not in msg, msg  # names the final path, not the temporary
    monkeypatch.undo()
    assert _tree(workspace / "predictions") == previous
    _assert_no_partial(workspace)


def test_disk_full_on_first_run_leaves_no_prediction_folder(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disk = _measure(workspace, monkeypatch)
    monkeypatch.setattr(atomic, "open", _Disk(sum(b for _, b in disk.written) // 3).open, raising=False)
    with pytest.raises(DiskFullError):
        _predict(workspace)
    monkeypatch.undo()
    assert not (workspace / "predictions" / "val").exists()
    _assert_no_partial(workspace)


def test_disk_full_in_the_second_split_keeps_every_previous_prediction(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(1)
    save_model(workspace / "old.pt", build_model(UNET), UNET)  # previous outputs from another model
    run_predict(
        model_path=workspace / "old.pt",
        prepared_dir=workspace / "prepared",
        out_dir=workspace / "predictions",
        **PREDICT,
    )
    previous = _tree(workspace / "predictions")
    disk = _measure(workspace, monkeypatch)
    start, end = _bytes_until(disk, "test")
    monkeypatch.setattr(atomic, "open", _Disk((start + end) // 2).open, raising=False)
    with pytest.raises(DiskFullError):
        _predict(workspace)
    monkeypatch.undo()
    _assert_no_partial(workspace)
    assert _tree(workspace / "predictions") == previous


def test_cli_prints_one_line_naming_the_file(
    workspace: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    from vesselseg.params import Params

    tree = Params().model_dump(mode="json")
    tree["predict"].update(window=16, overlap=0.25, batch_size=4)
    tree["train"].update(device="cpu", amp=False)
    (workspace / "params.yaml").write_text(yaml.safe_dump(tree))
    monkeypatch.chdir(workspace)
    monkeypatch.setattr(atomic, "open", _Disk(5000).open, raising=False)
    with pytest.raises(SystemExit) as stop:
        main(["--params", "params.yaml", "predict", "--model", "model.pt", "--prepared", "prepared", "--out", "out"])
    assert stop.value.code == 1
    err = capsys.readouterr().err
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith("error: out/val/probs/va0.npy: no space left on device"), err
    assert "Traceback" not in err
    monkeypatch.undo()
    assert not (workspace / "out" / "val").exists()
    assert not list((workspace / "out").rglob("*"))


def test_atomic_writers_turn_enospc_into_one_error_and_keep_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "metrics.json"
    atomic.write_json(target, {"dice": 0.5})
    old = target.read_bytes()
    monkeypatch.setattr(atomic, "open", _Disk(3).open, raising=False)
    with pytest.raises(DiskFullError, match=rf"^{target}: no space left on device"):
        atomic.write_json(target, {"dice": 0.9, "auc": 0.99})
    monkeypatch.undo()
    assert target.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_enospc_at_fsync_is_caught_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Delayed allocation: the write succeeds and the disk-full error comes at fsync."""
    target = tmp_path / "probs.npy"

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(DiskFullError, match="no space left"):
        atomic.write_npy(target, np.zeros((4, 4), np.float32))
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_other_os_errors_keep_their_type(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a full disk is re-labelled; anything else is a bug or a permission problem and keeps its traceback."""

    def denied(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", denied)
    with pytest.raises(OSError, match=re.escape(os.strerror(errno.EIO))) as err:
        atomic.write_text(tmp_path / "a.txt", "x")
    assert not isinstance(err.value, DiskFullError) and err.value.errno == errno.EIO
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
