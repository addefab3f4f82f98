"""The whole pipeline through DVC in a temporary git repo, on a tiny config.

What a new user does: `dvc repro`, again (nothing to do), `dvc exp run -S
train.lr=...` (only train/predict/evaluate re-run), `dvc exp show`, `dvc metrics
diff`, `dvc plots diff`, the fundus variant, `dvc repro --force` (byte-identical
metrics and model), the MLflow runs of both experiments, `dvc plots show` rendering
exactly the declared plots, DRIVE in one `dvc exp run -S dataset=drive`, and unknown
names or a missing source stopping before any work.

The project sits beside a link ``shared -> ../shared`` of this checkout (when present),
so the dataset configs' ``../shared/datasets/...`` sources resolve as in a real clone.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, SHARED
from tools import scratch

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TINY = {
    "data": {
        "synthetic": {"n_subjects": 6, "n_bscans": 48, "depth": 48, "width": 48, "slab": [20, 36]},
        "synthetic_fundus": {"n_images": 6, "size": 64},
        "val_fraction": 0.2,
        "test_fraction": 0.2,
    },
    "prepare": {"slab": [20, 36]},
    "patches": {"size": 32, "per_image": 24, "val_per_image": 8},
    "model": {"depth": 2, "base_channels": 4},
    "train": {"epochs": 2, "batch_size": 8, "threads": 1},
    "predict": {"window": 32, "batch_size": 8},
    "evaluate": {"n_overlays": 1},
}


def _run(cmd: list[str], cwd: Path, env: dict[str, str], stdout_only: bool = False) -> str:
    try:
        return scratch.run(cmd, cwd, env, stdout_only=stdout_only)
    except RuntimeError as err:
        pytest.fail(str(err))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    env = scratch.scratch_env(threads=1)
    base = tmp_path_factory.mktemp("e2e")
    if SHARED.parent.is_dir():
        (base / "shared").symlink_to(SHARED.parent, target_is_directory=True)
    root = scratch.make_project(base / "project", TINY, root=ROOT, env=env)
    return root, env


def test_repro_then_nothing_to_do(repo: tuple[Path, dict[str, str]]) -> None:
    root, env = repo
    out = _run(["dvc", "repro"], root, env)
    for stage in ("download", "prepare", "patches", "train", "predict", "evaluate"):
        assert f"Running stage '{stage}'" in out
    metrics = json.loads((root / "reports/metrics.json").read_text())
    for split in ("val", "test"):
        for key in (
            "dice",
            "iou",
            "accuracy",
            "sensitivity",
            "specificity",
            "precision",
            "balanced_accuracy",
            "auc_roc",
            "log_loss",
        ):
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
    diff = _run(["dvc", "metrics", "diff", "--all", "--json"], root, env, stdout_only=True)
    assert "reports/metrics.json" in json.loads(diff)
    plots = json.loads(_run(["dvc", "plots", "diff", "HEAD", "--json", "--split"], root, env, stdout_only=True))["data"]
    assert {"loss", "validation-scores", "roc", "precision-recall"} <= set(plots)
    assert set(plots["loss"][0]["revisions"]) == {"workspace", "HEAD"}, "both revisions on one plot"


def test_mlflow_holds_both_runs_with_commit_and_experiment(repo: tuple[Path, dict[str, str]]) -> None:
    root, env = repo
    assert (root / "mlflow.db").is_file(), "default store is <repo root>/mlflow.db"
    out = _run([sys.executable, "-m", "vesselseg.cli", "runs", "--csv"], root, env)
    lines = [ln for ln in out.splitlines() if ",train," in ln or ",evaluate," in ln]
    assert len([ln for ln in lines if ",train," in ln]) >= 2, out
    assert "lr-high" in out
    head = _run(["git", "rev-parse", "HEAD"], root, env).strip()
    assert head[:7] in out


def test_report_against_the_first_commit(repo: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    """Two commits with different train.lr, both reproduced: the report's numbers are right."""
    from tests.test_report import check_png, parse_table, section

    root, env = repo
    base = _run(["git", "rev-parse", "HEAD"], root, env).strip()
    old = json.loads(_run(["git", "show", f"{base}:reports/metrics.json"], root, env, stdout_only=True))
    _run(["git", "add", "-A"], root, env)  # the workspace holds the lr=0.003 experiment's results
    _run(["git", "commit", "-qm", "lr 0.003"], root, env)
    new = json.loads((root / "reports/metrics.json").read_text())
    out = tmp_path / "rep"
    _run([sys.executable, "-m", "vesselseg.cli", "report", "--base", base, "--out", str(out)], root, env)
    md = (out / "report.md").read_text()
    params = {r[0].strip("`"): r[1:] for r in parse_table(section(md, "Params changed"))[1:]}
    assert float(params["train.lr"][0]) == 0.001 and float(params["train.lr"][1]) == 0.003
    rows = {r[0].strip("`"): r[1:] for r in parse_table(section(md, "Metrics"))[1:]}
    for key in ("test.dice", "test.auc_roc", "val.dice"):
        split, metric = key.split(".")
        assert float(rows[key][0]) == pytest.approx(old[split][metric], abs=6e-5)
        assert float(rows[key][1]) == pytest.approx(new[split][metric], abs=6e-5)
    for name in ("training_curves.png", "roc.png", "pr.png"):
        check_png(out / name)


def test_fundus_variant_runs_through_the_same_stages(repo: tuple[Path, dict[str, str]]) -> None:
    root, env = repo
    out = _run(["dvc", "exp", "run", "-n", "fundus", "-S", "data.dataset=synthetic-fundus"], root, env)
    ran = set(re.findall(r"Running stage '(\w+)'", out))
    assert {"download", "prepare", "train", "evaluate"} <= ran
    metrics = json.loads((root / "reports/metrics.json").read_text())
    assert metrics["test"]["n_images"] >= 1


def test_plots_show_renders_exactly_the_declared_plots(repo: tuple[Path, dict[str, str]]) -> None:
    """One plot per top-level declaration (no stage-level duplicates guessing a y column)."""
    import yaml

    root, env = repo
    shown = json.loads(_run(["dvc", "plots", "show", "--json"], root, env, stdout_only=True))["data"]
    declared = [next(iter(e)) for e in yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"] if isinstance(e, dict)]
    overlays = {f"reports/figures/overlays/{p.name}" for p in (root / "reports/figures/overlays").glob("*.png")}
    assert overlays and set(shown) == set(declared) | overlays
    titles = {k: v[0]["content"]["title"]["text"] for k, v in shown.items() if k in declared}
    assert titles["roc"] == "ROC curve (pooled FOV pixels)" and len(set(titles.values())) == len(declared)


@pytest.mark.skipif(not (SHARED / "DRIVE").is_dir(), reason="needs ../shared/datasets/DRIVE (licensed, not in git)")
def test_drive_in_one_dvc_exp_run(repo: tuple[Path, dict[str, str]]) -> None:
    """`dvc exp run -S dataset=drive` as the README types it, plus a tiny training budget."""
    root, env = repo
    budget = [
        "-S",
        "train.epochs=1",
        "-S",
        "patches.per_image=16",
        "-S",
        "patches.val_per_image=8",
        "-S",
        "train.max_minutes=2",
        "-S",
        "evaluate.n_overlays=1",
    ]
    out = _run(["dvc", "exp", "run", "-n", "drive-tiny", "-S", "dataset=drive", *budget], root, env)
    assert {"download", "prepare", "patches", "train", "predict", "evaluate"} <= set(
        re.findall(r"Running stage '(\w+)'", out)
    )
    params = (root / "params.yaml").read_text()
    assert "dataset: drive" in params and "source: ../shared/datasets/DRIVE" in params and "gamma: 1.2" in params
    metrics = json.loads((root / "reports/metrics.json").read_text())
    assert metrics["test"]["n_images"] == 20 and 0.0 < metrics["test"]["auc_roc"] <= 1.0
    shown = _run(["dvc", "exp", "show", "--md"], root, env)
    assert "drive-tiny" in shown


def _failed(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    import subprocess

    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0, res.stdout[-2000:]
    return res.stdout + res.stderr


@pytest.mark.parametrize(
    ("override", "first_line"),
    [
        ("dataset=drivee", "ERROR: unexpected error - In 'config': Could not find 'dataset/drivee'"),
        ("recipe=knnn", "ERROR: unexpected error - In 'config': Could not find 'recipe/knnn'"),
    ],
    ids=["unknown-dataset", "unknown-recipe"],
)
def test_unknown_name_stops_dvc_exp_run_before_any_stage(
    repo: tuple[Path, dict[str, str]], override: str, first_line: str
) -> None:
    """Hydra refuses the composition before DVC touches params.yaml or runs a stage.
    DVC prints its first line as below, then Hydra's list of valid names."""
    root, env = repo
    before = (root / "params.yaml").read_bytes()
    out = _failed(["dvc", "exp", "run", "-S", override], root, env)
    assert out.strip().splitlines()[0] == first_line, out
    assert "Running stage" not in out and (root / "params.yaml").read_bytes() == before


def test_missing_source_stops_the_download_stage_in_one_line(repo: tuple[Path, dict[str, str]]) -> None:
    """The first stage refuses a data.source that does not exist before reading anything:
    one `error:` line, nothing else run.  (DVC itself removed data/raw before the stage
    started, as `dvc repro` does for every stage it runs; `dvc checkout dvc.yaml` restores
    it.  The target is the pipeline: the shipped pretrained weights are DVC-tracked too and
    this scratch project, like any clone without the project's DVC remote, lacks them.)"""
    root, env = repo
    out = _failed(["dvc", "exp", "run", "-S", "dataset=drive", "-S", "data.source=/nonexistent/DRIVE"], root, env)
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: data.source: /nonexistent/DRIVE does not exist"), out
    assert re.findall(r"Running stage '(\w+)'", out) == ["download"] and "Traceback" not in out
    _run(["git", "checkout", "--", "params.yaml"], root, env)
    _run(["dvc", "checkout", "--force", "dvc.yaml"], root, env)
