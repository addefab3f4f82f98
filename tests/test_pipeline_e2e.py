"""The whole pipeline through DVC in a temporary git repo, on a tiny config.

What a new user does: `dvc repro`, again (nothing to do), `dvc exp run -S
train.lr=...` (only train/predict/evaluate re-run), `dvc exp show`, `dvc metrics
diff`, `dvc plots diff`, the fundus variant, `dvc repro --force` (byte-identical
metrics and model), and the MLflow runs of both experiments.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TINY = {
    "data": {"synthetic": {"n_subjects": 6, "n_bscans": 48, "depth": 48, "width": 48, "slab": [20, 36]},
             "synthetic_fundus": {"n_images": 6, "size": 64}, "val_fraction": 0.2, "test_fraction": 0.2},
    "prepare": {"slab": [20, 36]},
    "patches": {"size": 32, "per_image": 24, "val_per_image": 8},
    "model": {"depth": 2, "base_channels": 4},
    "train": {"epochs": 2, "batch_size": 8, "threads": 1},
    "predict": {"window": 32, "batch_size": 8},
    "evaluate": {"n_overlays": 1},
}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return out


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout + res.stderr


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    repo = tmp_path_factory.mktemp("e2e") / "project"
    repo.mkdir()
    for name in ("dvc.yaml", "stages", "src", "pyproject.toml"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, repo / name,
                                                            **({"ignore": shutil.ignore_patterns("__pycache__")}
                                                               if src.is_dir() else {}))
    shutil.copy2(ROOT / ".gitignore", repo / ".gitignore")
    params = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "VESSELSEG_THREADS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("VESSELSEG_TRACKING", None)
    _run(["git", "init", "-q", "-b", "main"], repo, env)
    _run(["dvc", "init", "-q"], repo, env)
    _run(["dvc", "config", "core.analytics", "false"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "init"], repo, env)
    return repo, env


def test_repro_then_nothing_to_do(repo: tuple[Path, dict[str, str]]) -> None:
    root, env = repo
    out = _run(["dvc", "repro"], root, env)
    for stage in ("download", "prepare", "patches", "train", "predict", "evaluate"):
        assert f"Running stage '{stage}'" in out
    metrics = json.loads((root / "reports/metrics.json").read_text())
    for split in ("val", "test"):
        for key in ("dice", "iou", "accuracy", "sensitivity", "specificity", "precision", "balanced_accuracy",
                    "auc_roc", "log_loss"):
            assert 0.0 <= metrics[split][key] <= (10.0 if key == "log_loss" else 1.0), (split, key)
    assert (root / "models/model.pt").is_file()
    assert (root / "reports/per_image.csv").read_text().startswith("split,id,dice")
    assert len(list((root / "reports/figures/overlays").glob("*.png"))) == 1
    again = _run(["dvc", "repro"], root, env)
    assert "Running stage" not in again
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "baseline run"], root, env)


def test_force_repro_is_byte_identical(repo: tuple[Path, dict[str, str]]) -> None:
    root, env = repo
    metrics, model = (root / "reports/metrics.json").read_bytes(), _sha(root / "models/model.pt")
    _run(["dvc", "repro", "--force"], root, env)
    assert (root / "reports/metrics.json").read_bytes() == metrics
    assert _sha(root / "models/model.pt") == model


def test_exp_run_lr_reruns_only_train_predict_evaluate(repo: tuple[Path, dict[str, str]]) -> None:
    root, env = repo
    out = _run(["dvc", "exp", "run", "-n", "lr-high", "-S", "train.lr=0.003"], root, env)
    ran = set(re.findall(r"Running stage '(\w+)'", out))
    assert ran == {"train", "predict", "evaluate"}, out[-2000:]
    show = _run(["dvc", "exp", "show", "--md"], root, env)
    assert "lr-high" in show and "test.dice" in show
    diff = _run(["dvc", "metrics", "diff", "--all", "--json"], root, env)
    assert "reports/metrics.json" in json.loads(diff)
    plots = _run(["dvc", "plots", "diff", "HEAD", "--json", "--split"], root, env)
    text = plots.lower()
    assert "history.csv" in text and "roc.csv" in text


def test_mlflow_holds_both_runs_with_commit_and_experiment(repo: tuple[Path, dict[str, str]]) -> None:
    root, env = repo
    assert (root / "mlflow.db").is_file(), "default store is <repo root>/mlflow.db"
    out = _run([sys.executable, "-m", "vesselseg.cli", "runs", "--csv"], root, env)
    lines = [ln for ln in out.splitlines() if ",train," in ln or ",evaluate," in ln]
    assert len([ln for ln in lines if ",train," in ln]) >= 2, out
    assert "lr-high" in out
    head = _run(["git", "rev-parse", "HEAD"], root, env).strip()
    assert head[:7] in out


def test_fundus_variant_runs_through_the_same_stages(repo: tuple[Path, dict[str, str]]) -> None:
    root, env = repo
    out = _run(["dvc", "exp", "run", "-n", "fundus", "-S", "data.dataset=synthetic-fundus"], root, env)
    ran = set(re.findall(r"Running stage '(\w+)'", out))
    assert {"download", "prepare", "train", "evaluate"} <= ran
    metrics = json.loads((root / "reports/metrics.json").read_text())
    assert metrics["test"]["n_images"] >= 1
