"""Kill every stage mid-write: each declared output is the old version, the new one, or absent.

A tiny pipeline (generated OCTA volumes, a 4-channel U-Net) is run once in-process:
version A of every output.  Each stage is then run again as ``python
stages/<stage>.py`` with one changed param (version B) in a copy of that workspace,
under a small driver that SIGKILLs the process at a chosen moment:

* ``mid:K``    while the K-th output file is being written (it is cut to half its
  size, then the process is killed before it is synced and renamed);
* ``before:K`` just before the K-th ``os.replace`` (a file or folder is complete
  under its temporary name);
* ``after:K``  just after the K-th ``os.replace``.

A counting run (the same driver, no kill) records every ``os.replace`` of the stage
and is version B.  After a kill, every output ``dvc.yaml`` declares for the stage
must be absent, equal to A or equal to B (or, for the train stage's history and
metrics, which hold wall-clock seconds, a complete file), and no visible file may be
truncated; temporaries may remain only under hidden ``.tmp-<pid>-``/``.old-<pid>-``
names.  The next complete run must then remove them (``vesselseg.atomic.sweep_stale``)
and produce B.  A last test kills a real ``stages/predict.py`` from outside, at the
moment its temporary folder appears, without any driver.

DVC itself adds the last guarantee: it records outputs in ``dvc.lock`` and the cache
only after the command exits 0, so a killed stage is never cached and re-runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from tests.helpers import ROOT
from vesselseg.params import Params, set_dotted

pytestmark = pytest.mark.timeout(300)

# Stage -> (arguments as in dvc.yaml, declared outputs).
STAGES: dict[str, tuple[list[str], list[str]]] = {
    "download": (["--out", "data/raw"], ["data/raw"]),
    "prepare": (["--raw", "data/raw", "--out", "data/prepared"], ["data/prepared"]),
    "patches": (["--prepared", "data/prepared", "--out", "data/patches"], ["data/patches"]),
    "train": (
        [
            "--patches",
            "data/patches",
            "--prepared",
            "data/prepared",
            "--model",
            "models/model.pt",
            "--checkpoint",
            "models/checkpoint.pt",
            "--history",
            "reports/train/history.csv",
            "--metrics",
            "reports/train/metrics.json",
        ],
        ["models/model.pt", "reports/train/history.csv", "reports/train/metrics.json"],
    ),
    "predict": (
        ["--model", "models/model.pt", "--prepared", "data/prepared", "--out", "data/predictions"],
        ["data/predictions"],
    ),
    "evaluate": (
        [
            "--prepared",
            "data/prepared",
            "--predictions",
            "data/predictions",
            "--metrics",
            "reports/metrics.json",
            "--per-image",
            "reports/per_image.csv",
            "--plots",
            "reports/plots",
            "--overlays",
            "reports/figures/overlays",
        ],
        ["reports/metrics.json", "reports/per_image.csv", "reports/plots", "reports/figures/overlays"],
    ),
}
# Files whose content holds timings, so equal params do not give equal bytes.
TIMED = {"reports/train/history.csv", "reports/train/metrics.json"}

TINY: dict[str, Any] = {
    "data.dataset": "synthetic",
    "data.val_fraction": 0.2,
    "data.test_fraction": 0.2,
    "data.synthetic.n_subjects": 4,
    "data.synthetic.n_bscans": 16,
    "data.synthetic.depth": 16,
    "data.synthetic.width": 16,
    "data.synthetic.slab": [4, 12],
    "prepare.slab": [4, 12],
    "prepare.equalize": "global",
    "patches.size": 8,
    "patches.per_image": 8,
    "patches.val_per_image": 4,
    "model.depth": 1,
    "model.base_channels": 4,
    "model.dropout": 0.0,
    "train.epochs": 2,
    "train.batch_size": 4,
    "train.device": "cpu",
    "train.amp": False,
    "train.threads": 1,
    "predict.window": 16,
    "predict.overlap": 0.25,
    "predict.weighting": "constant",
    "predict.batch_size": 4,
    "evaluate.n_overlays": 1,
    "evaluate.curve_points": 11,
}
# Version B of each stage: one param of its own section changed.
CHANGE: dict[str, dict[str, Any]] = {
    "download": {"data.seed": 1},
    "prepare": {"prepare.gamma": 1.5},
    "patches": {"seed": 1},
    "train": {"train.lr": 0.01},
    "predict": {"predict.window": 8, "predict.overlap": 0.5, "predict.weighting": "gaussian"},
    "evaluate": {"predict.threshold": 0.3},
}

# Runs a stage script after wrapping os.replace/os.fsync to SIGKILL at one moment.
DRIVER = r"""
import json, os, runpy, signal, sys
kind, _, k = os.environ["KILL_AT"].partition(":")
k = int(k or 0)
real_replace, real_fsync = os.replace, os.fsync
seen = {"replace": 0, "fsync": 0}
log = []

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def replace(src, dst, *args, **kwargs):
    seen["replace"] += 1
    if kind == "before" and seen["replace"] == k:
        die()
    out = real_replace(src, dst, *args, **kwargs)
    log.append([os.fspath(src), os.fspath(dst)])
    if kind == "after" and seen["replace"] == k:
        die()
    return out

def fsync(fd):
    seen["fsync"] += 1
    if kind == "mid" and seen["fsync"] == k:
        path = os.readlink(f"/proc/self/fd/{fd}")
        os.truncate(path, os.path.getsize(path) // 2)
        die()
    return real_fsync(fd)

os.replace, os.fsync = replace, fsync
script, sys.argv = sys.argv[1], sys.argv[1:]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    with open(os.environ["KILL_LOG"], "w") as fh:
        json.dump({"replace": log, "fsync": seen["fsync"]}, fh)
"""

ENV = {
    "VESSELSEG_TRACKING": "0",
    "VESSELSEG_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "VESSELSEG_LOG": "WARNING",
    "DVC_NO_ANALYTICS": "1",
}


def _hidden_temp(name: str) -> bool:
    return name.startswith((".tmp-", ".old-"))


def write_params(root: Path, extra: dict[str, Any]) -> None:
    tree = Params().model_dump(mode="json")
    for key, value in {**TINY, **extra}.items():
        set_dotted(tree, key, value)
    (root / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))


def fingerprint(path: Path) -> str | None:
    """Hash of a file, or of a folder's visible files (names and bytes); None if absent."""
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    if not path.is_dir():
        return None
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if p.is_file() and not any(_hidden_temp(part) for part in rel.parts):
            h.update(str(rel).encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def assert_complete(path: Path) -> None:
    """A visible file must parse as its format: a truncated one would not."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        json.loads(path.read_text())
    elif suffix == ".csv":
        assert len(pd.read_csv(path).columns) >= 2, path
    elif suffix == ".npy":
        np.load(path, allow_pickle=False)
    elif suffix in (".png", ".bmp"):
        assert cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED) is not None, path
    elif suffix == ".pt":
        import torch

        torch.load(path, weights_only=True)


def run_inprocess(root: Path, stage: str) -> None:
    from vesselseg.cli import main

    cwd = os.getcwd()
    os.chdir(root)
    try:
        main(["--params", "params.yaml", stage, *STAGES[stage][0]])
    finally:
        os.chdir(cwd)


def run_killed(root: Path, stage: str, kill_at: str) -> tuple[int, dict[str, Any], str]:
    log = root / ".kill-log.json"
    env = {**os.environ, **ENV, "KILL_AT": kill_at, "KILL_LOG": str(log)}
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, str(ROOT / "stages" / f"{stage}.py"), *STAGES[stage][0]],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    record = json.loads(log.read_text()) if log.exists() else {}
    log.unlink(missing_ok=True)
    return proc.returncode, record, proc.stderr


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Workspace A (all stages run in-process) and, per stage, B's fingerprints and event log."""
    a = tmp_path_factory.mktemp("a")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in ENV.items():
            mp.setenv(key, value)
        write_params(a, {})
        for stage in STAGES:
            run_inprocess(a, stage)
    out: dict[str, Any] = {"A": a, "B": {}}
    return out


def _version_b(versions: dict[str, Any], stage: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run ``stage`` with its changed param in a copy of A, in-process, recording each os.replace."""
    if stage not in versions["B"]:
        b = tmp_path_factory.mktemp(f"b-{stage}")
        shutil.copytree(versions["A"], b, dirs_exist_ok=True)
        write_params(b, CHANGE[stage])
        replaces: list[list[str]] = []
        real = os.replace

        def recording(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            real(src, dst, *args, **kwargs)
            replaces.append([os.fspath(src), os.fspath(dst)])

        with pytest.MonkeyPatch.context() as mp:
            for key, value in ENV.items():
                mp.setenv(key, value)
            mp.setattr(os, "replace", recording)
            run_inprocess(b, stage)
        prints = {rel: fingerprint(b / rel) for rel in STAGES[stage][1]}
        a_prints = {rel: fingerprint(versions["A"] / rel) for rel in STAGES[stage][1]}
        assert any(prints[rel] != a_prints[rel] for rel in prints), f"version B of {stage} must differ from A"
        # the driver's process counts from its own start: make the paths relative to the workspace
        rel_replaces = [[os.path.relpath(os.path.join(b, x), b) for x in pair] for pair in replaces]
        versions["B"][stage] = {"root": b, "prints": prints, "record": {"replace": rel_replaces}}
    return versions["B"][stage]


def _moment(spec: str, record: dict[str, Any]) -> str:
    """Turn 'before:last' or 'after:<dst suffix>' into a concrete KILL_AT value."""
    kind, _, where = spec.partition(":")
    replaces = record["replace"]
    if where == "last":
        return f"{kind}:{len(replaces)}"
    if where == "middle":
        return f"{kind}:{max(1, len(replaces) // 2)}"
    if where.isdigit():
        return spec
    hits = [i + 1 for i, (_, dst) in enumerate(replaces) if dst.endswith(where)]
    assert hits, f"no os.replace into {where!r} in {replaces}"
    return f"{kind}:{hits[0]}"


# One or two moments per stage: every subprocess pays the stage's imports (torch,
# albumentations), so the list is kept short; each moment is a different kind of gap.
MOMENTS = [
    ("download", "mid:1"),  # a B-scan half written inside the temporary raw folder
    ("prepare", "mid:1"),  # a prepared image half written
    ("prepare", "before:last"),  # old folder moved aside, new one not yet in place: none
    ("patches", "mid:2"),
    ("train", "after:checkpoint.pt"),  # mid-training: resume state written, model not yet
    ("predict", "mid:3"),  # a probability map half written inside the temporary folder
    ("predict", "before:last"),  # old predictions moved aside, new ones not yet in place: none
    ("evaluate", "after:reports/metrics.json"),  # metrics.json new, per_image.csv and plots still old
]


@pytest.mark.parametrize(("stage", "spec"), MOMENTS)
@pytest.mark.slow
def test_kill_leaves_old_new_or_nothing_and_next_run_cleans_up(
    stage: str,
    spec: str,
    versions: dict[str, Any],
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    b = _version_b(versions, stage, tmp_path_factory)
    a_root: Path = versions["A"]
    work = tmp_path / "w"
    shutil.copytree(a_root, work)
    write_params(work, CHANGE[stage])
    kill_at = _moment(spec, b["record"])

    code, _, err = run_killed(work, stage, kill_at)
    assert code == -signal.SIGKILL, f"{stage} {kill_at}: not killed (exit {code})\n{err[-2000:]}"

    for rel in STAGES[stage][1]:
        got = fingerprint(work / rel)
        allowed = {None, fingerprint(a_root / rel), b["prints"][rel]}
        if got not in allowed:
            assert rel in TIMED, f"{stage} killed at {kill_at}: {rel} is neither absent, the old nor the new version"
        visible = (
            [work / rel]
            if (work / rel).is_file()
            else [
                p
                for p in (work / rel).rglob("*")
                if p.is_file() and not any(_hidden_temp(s) for s in p.relative_to(work).parts)
            ]
        )
        for path in visible:
            assert_complete(path)
    # nothing new outside the declared outputs except hidden temporaries
    new = {p.relative_to(work) for p in work.rglob("*")} - {p.relative_to(a_root) for p in a_root.rglob("*")}
    outs = [Path(r) for r in STAGES[stage][1]] + [Path("models/checkpoint.pt")]
    stray = [
        p for p in new if not any(_hidden_temp(s) for s in p.parts) and not any(p == o or o in p.parents for o in outs)
    ]
    assert not stray, stray

    # the next complete run removes the killed run's leftovers and gives version B
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    run_inprocess(work, stage)
    leftovers = [p for p in work.rglob("*") if _hidden_temp(p.name)]
    assert not leftovers, leftovers
    for rel in STAGES[stage][1]:
        if rel not in TIMED:
            assert fingerprint(work / rel) == b["prints"][rel], f"{rel} after the re-run differs from version B"


@pytest.mark.slow
def test_external_sigkill_of_predict_while_its_temporary_folder_exists(
    versions: dict[str, Any], tmp_path: Path
) -> None:
    """No driver: a plain ``python stages/predict.py`` killed from outside mid-run."""
    a_root: Path = versions["A"]
    work = tmp_path / "w"
    shutil.copytree(a_root, work)
    # many small windows make the run last long enough to be caught mid-split
    write_params(work, {"predict.window": 8, "predict.overlap": 0.85, "predict.batch_size": 1})
    old = fingerprint(work / "data/predictions")
    env = {**os.environ, **ENV}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "stages/predict.py"), *STAGES["predict"][0]],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    caught = False
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            # the whole output folder is built as data/.tmp-<pid>-predictions-* and swapped in
            if any(p.name.startswith(".tmp-") and "predictions" in p.name for p in (work / "data").iterdir()):
                proc.send_signal(signal.SIGKILL)
                caught = True
                break
            time.sleep(0.001)
    finally:
        if proc.poll() is None and not caught:
            proc.kill()
        proc.wait()
    assert caught and proc.returncode == -signal.SIGKILL, "predict finished before its temporary folder was seen"
    assert fingerprint(work / "data/predictions") == old  # killed while building val: old outputs intact
    assert [p.name for p in (work / "data").iterdir() if p.name.startswith(".tmp-")]


def test_sweep_removes_only_leftovers_of_dead_processes(tmp_path: Path) -> None:
    from vesselseg import atomic

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)  # exited and reaped: no such process now
    live = os.getpid()
    (tmp_path / f".tmp-{dead}-metrics-abc.json").write_text("{")
    (tmp_path / f".tmp-{dead}-prepared-xyz").mkdir()
    (tmp_path / f".tmp-{dead}-prepared-xyz" / "a.png").write_bytes(b"x")
    (tmp_path / f".old-{dead}-predictions").mkdir()
    (tmp_path / f".tmp-{live}-metrics-def.json").write_text("{")  # a live writer's file
    (tmp_path / ".tmp-scratch-old-style").mkdir()  # not a name atomic makes: left alone
    (tmp_path / "metrics.json").write_text("{}")
    removed = atomic.sweep_stale(tmp_path)
    assert sorted(p.name for p in removed) == sorted(
        [f".tmp-{dead}-metrics-abc.json", f".tmp-{dead}-prepared-xyz", f".old-{dead}-predictions"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f".tmp-{live}-metrics-def.json", ".tmp-scratch-old-style", "metrics.json"]
    )
    # an atomic write into the folder sweeps it too (once per process and folder)
    other = tmp_path / "sub"
    other.mkdir()
    (other / f".tmp-{dead}-x.npy").write_bytes(b"")
    atomic.write_text(other / "x.txt", "ok")
    assert sorted(p.name for p in other.iterdir()) == ["x.txt"]


IPN: dict[str, Any] = {
    "model.name": "ipn",
    "prepare.volumes": True,
    "prepare.volume_depth": 4,
    "model.ipn.channels": 2,
    "model.ipn.n_blocks": 1,
    "model.ipn.block": 8,
    "train.epochs": 1,
}


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["mid:3", "before:last"])
def test_kill_of_ipn_predict_leaves_old_new_or_nothing(
    spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The IPN goes through the same prediction writer: the whole data/predictions is swapped at once."""
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    out = "data/predictions"
    a = tmp_path / "a"
    a.mkdir()
    write_params(a, IPN)
    for stage in ("download", "prepare", "patches", "train", "predict"):
        run_inprocess(a, stage)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    write_params(b, {**IPN, **CHANGE["predict"]})
    replaces: list[list[str]] = []
    real = os.replace

    def recording(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        real(src, dst, *args, **kwargs)
        replaces.append([os.path.relpath(os.fspath(src), b), os.path.relpath(os.fspath(dst), b)])

    monkeypatch.setattr(os, "replace", recording)
    run_inprocess(b, "predict")
    monkeypatch.setattr(os, "replace", real)
    old, new = fingerprint(a / out), fingerprint(b / out)
    assert old != new

    work = tmp_path / "w"
    shutil.copytree(a, work)
    write_params(work, {**IPN, **CHANGE["predict"]})
    code, _, err = run_killed(work, "predict", _moment(spec, {"replace": replaces}))
    assert code == -signal.SIGKILL, f"not killed (exit {code})\n{err[-2000:]}"
    assert fingerprint(work / out) in {None, old, new}
    for path in (work / out).rglob("*") if (work / out).is_dir() else []:
        if path.is_file() and not any(_hidden_temp(s) for s in path.relative_to(work).parts):
            assert_complete(path)
    run_inprocess(work, "predict")
    assert fingerprint(work / out) == new and not [p for p in work.rglob("*") if _hidden_temp(p.name)]
