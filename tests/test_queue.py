"""Queue safety: two queued experiments run in parallel (`dvc queue start -j 2`).

Both must appear in `dvc exp show` and in the one MLflow store at the repository
root, each tagged with its own DVC experiment name, although DVC runs them in
temporary copies under .dvc/tmp/exps.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.test_pipeline_e2e import TINY
from tools import scratch

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_two_queued_experiments_in_parallel(tmp_path: Path) -> None:
    env = scratch.scratch_env(threads=1)
    root = scratch.make_project(tmp_path / "project", TINY, root=ROOT, env=env)
    scratch.run(["dvc", "repro"], root, env)
    scratch.run(["git", "add", "-A"], root, env)
    scratch.run(["git", "commit", "-qm", "baseline"], root, env)
    for name, lr in (("qa", "0.002"), ("qb", "0.004")):
        scratch.run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"train.lr={lr}"], root, env)
    scratch.run(["dvc", "queue", "start", "-j", "2"], root, env)
    deadline = time.monotonic() + 800
    while time.monotonic() < deadline:
        status = scratch.run(["dvc", "queue", "status"], root, env)
        if "Running" not in status and "Queued" not in status:
            break
        time.sleep(3)
    assert "Failed" not in status, status + scratch.run(["dvc", "queue", "logs", "qa"], root, env)[-2000:]
    shown = json.loads(scratch.run(["dvc", "exp", "show", "--json"], root, env))
    names = json.dumps(shown)
    assert '"qa"' in names and '"qb"' in names
    runs = scratch.run([sys.executable, "-m", "vesselseg.cli", "runs", "--csv"], root, env)
    for name in ("qa", "qb"):
        assert sum(1 for ln in runs.splitlines() if f",{name}," in ln and ",train," in ln) == 1, runs
        assert sum(1 for ln in runs.splitlines() if f",{name}," in ln and ",evaluate," in ln) == 1, runs
    assert not list((root / ".dvc" / "tmp" / "exps").rglob("mlflow.db")), "runs must land in the root store"
