"""The PR report on a temporary git repository with two committed results.

The committed files are written here by hand (plausible shapes and values); the
real pipeline's outputs are covered by the lead's end-to-end test.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from vesselseg.params import flatten
from vesselseg.report import build_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

PARAMS_OLD = {"data": {"dataset": "synthetic", "seed": 0}, "train": {"lr": 0.001, "epochs": 4}, "model": {"depth": 3}}
PARAMS_NEW = {"data": {"dataset": "synthetic", "seed": 0}, "train": {"lr": 0.0003, "epochs": 4}, "model": {"depth": 3}}

METRICS_OLD = {
    "test": {
        "dice": 0.71234,
        "auc_roc": 0.95,
        "sensitivity": 0.7,
        "specificity": 0.97,
        "log_loss": 0.21,
        "n_images": 3,
        "cldice": 0.74,
        "betti0_error": 12.333333,
        "betti1_error": 3.0,
        "cal": 0.61,
    },
    "val": {
        "dice": 0.70001,
        "auc_roc": 0.94,
        "sensitivity": 0.69,
        "specificity": 0.96,
        "log_loss": 0.22,
        "n_images": 2,
        "cldice": 0.72,
        "betti0_error": 15.5,
        "betti1_error": 2.5,
        "cal": 0.6,
    },
}
METRICS_NEW = {
    "test": {
        "dice": 0.75678,
        "auc_roc": 0.962,
        "sensitivity": 0.74,
        "specificity": 0.968,
        "log_loss": 0.18,
        "n_images": 3,
        "cldice": 0.781234,
        "betti0_error": 8.0,
        "betti1_error": 2.333333,
        "cal": 0.67,
    },
    "val": {
        "dice": 0.73,
        "auc_roc": 0.951,
        "sensitivity": 0.72,
        "specificity": 0.965,
        "log_loss": 0.19,
        "n_images": 2,
        "cldice": 0.75,
        "betti0_error": 9.5,
        "betti1_error": 2.0,
        "cal": 0.65,
    },
}
TRAIN_OLD = {"best_epoch": 3, "best_val_dice": 0.70001, "epochs_run": 4, "train_seconds": 12.5, "n_params": 480000}
TRAIN_NEW = {"best_epoch": 2, "best_val_dice": 0.73, "epochs_run": 4, "train_seconds": 14.25, "n_params": 480000}


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def history(lr_scale: float) -> pd.DataFrame:
    epochs = np.arange(1, 5)
    return pd.DataFrame(
        {
            "epoch": epochs,
            "train_loss": 1.0 / epochs,
            "val_loss": 1.1 / epochs,
            "val_dice": 0.5 + 0.05 * epochs * lr_scale,
            "lr": 0.001 * lr_scale,
            "seconds": 3.0 * epochs,
        }
    )


def curves(power: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    t = np.linspace(1, 0, 11)
    fpr = np.linspace(0, 1, 11)
    roc = pd.concat(
        [pd.DataFrame({"split": s, "fpr": fpr, "tpr": fpr**power, "threshold": t}) for s in ("val", "test")]
    )
    rec = np.linspace(0, 1, 11)
    pr = pd.concat(
        [
            pd.DataFrame({"split": s, "recall": rec, "precision": 1 - rec ** (1 / power) * 0.5, "threshold": t})
            for s in ("val", "test")
        ]
    )
    return roc, pr


def write(repo: Path, rel: str, content: str | bytes) -> None:
    path = repo / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)


def commit_results(
    repo: Path,
    params: dict,
    metrics: dict,
    train: dict,
    hist: pd.DataFrame,
    roc: pd.DataFrame,
    pr: pd.DataFrame | None,
    msg: str,
) -> str:
    import yaml

    write(repo, "params.yaml", yaml.safe_dump(params))
    write(repo, "reports/metrics.json", json.dumps(metrics))
    write(repo, "reports/train/metrics.json", json.dumps(train))
    write(repo, "reports/train/history.csv", hist.to_csv(index=False))
    write(repo, "reports/plots/roc.csv", roc.to_csv(index=False))
    if pr is not None:
        write(repo, "reports/plots/pr.csv", pr.to_csv(index=False))
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", msg)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path: Path) -> dict[str, Any]:
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.name", "Test")
    git(root, "config", "user.email", "test@example.com")
    roc1, _ = curves(0.3)
    first = commit_results(root, PARAMS_OLD, METRICS_OLD, TRAIN_OLD, history(1.0), roc1, None, "base: no pr.csv yet")
    git(root, "checkout", "-q", "-b", "feature")
    roc2, pr2 = curves(0.2)
    second = commit_results(root, PARAMS_NEW, METRICS_NEW, TRAIN_NEW, history(0.5), roc2, pr2, "lower lr")
    # a prediction overlay in the workspace (DVC-cached in real life, so not committed)
    overlay = Image.fromarray(np.arange(64 * 48 * 3, dtype=np.uint8).reshape(48, 64, 3))
    buf = io.BytesIO()
    overlay.save(buf, format="PNG")
    write(root, "reports/figures/overlays/b_img.png", buf.getvalue())
    write(root, "reports/figures/overlays/a_img.png", buf.getvalue())
    (root / ".git" / "info" / "exclude").write_text("reports/figures/\nout/\n")
    return {"root": root, "first": first, "second": second, "overlay": buf.getvalue()}


def section(md: str, title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", md, flags=re.M | re.S)
    assert match, f"section {title!r} missing from report"
    return match.group(1)


def parse_table(text: str) -> list[list[str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    assert len(lines) >= 2 and set(lines[1].replace("|", "")) <= {"-", ":", " "}
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in [lines[0], *lines[2:]]]


def check_png(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    with Image.open(path) as img:
        img.load()
        assert img.width > 40 and img.height > 40
        return img.size


@pytest.mark.slow
def test_report_tables_and_figures(repo: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out"
    path = build_report(
        base=repo["first"], rev=None, out_dir=out, repo=repo["root"], uri=f"sqlite:///{tmp_path}/none.db"
    )
    assert path == out / "report.md"
    md = path.read_text()

    # params: exactly the ones that differ, with both values
    table = parse_table(section(md, "Params changed"))
    old_flat, new_flat = flatten(PARAMS_OLD), flatten(PARAMS_NEW)
    changed = sorted(k for k in old_flat if old_flat[k] != new_flat[k])
    assert [row[0].strip("`") for row in table[1:]] == changed == ["train.lr"]
    assert float(table[1][1]) == 0.001 and float(table[1][2]) == 0.0003

    # metrics: every metric of both files, old/new/delta against our own arithmetic
    table = parse_table(section(md, "Metrics"))
    assert table[0][0] == "metric" and table[0][3] == "delta"
    rows = {row[0].strip("`"): row[1:] for row in table[1:]}
    expect_old = {**flatten(METRICS_OLD), **flatten(TRAIN_OLD, "train.")}
    expect_new = {**flatten(METRICS_NEW), **flatten(TRAIN_NEW, "train.")}
    assert set(rows) == set(expect_old)
    for key, (old_txt, new_txt, delta_txt) in rows.items():
        assert float(old_txt) == pytest.approx(expect_old[key], abs=6e-5), key
        assert float(new_txt) == pytest.approx(expect_new[key], abs=6e-5), key
        assert float(delta_txt) == pytest.approx(expect_new[key] - expect_old[key], abs=6e-5), key
    assert rows["test.dice"][2] == "+0.0444"
    assert rows["test.cldice"] == ["0.7400", "0.7812", "+0.0412"]  # topology metrics diff like the rest
    assert rows["test.betti0_error"] == ["12.3333", "8.0000", "-4.3333"]
    assert rows["train.n_params"] == ["480000", "480000", "+0"]

    # per-dataset table: both revisions, headline test metrics
    table = parse_table(section(md, "Per dataset"))
    header = table[0]
    by_rev = {row[1].split()[0]: dict(zip(header, row, strict=True)) for row in table[1:]}
    assert set(by_rev) == {"base", "new"}
    assert by_rev["base"]["dataset"] == by_rev["new"]["dataset"] == "synthetic"
    assert float(by_rev["new"]["test dice"]) == pytest.approx(0.75678, abs=6e-5)
    assert float(by_rev["base"]["val auc_roc"]) == pytest.approx(0.94, abs=6e-5)
    for split in ("test", "val"):  # topology columns next to the pixel metrics
        for metric in ("cldice", "betti0_error", "betti1_error", "cal"):
            for role, metrics in (("base", METRICS_OLD), ("new", METRICS_NEW)):
                assert float(by_rev[role][f"{split} {metric}"]) == pytest.approx(metrics[split][metric], abs=6e-5)

    # MLflow: no store, said so
    assert "No MLflow store" in section(md, "MLflow runs (newest run of each stage per commit)")

    # the base commit had no pr.csv: reported as missing, PR figure still drawn from the new one
    missing = section(md, "Missing files")
    assert f"`reports/plots/pr.csv` absent at base {repo['first'][:8]}" in missing
    assert "absent at new" not in missing

    for name in ("training_curves.png", "roc.png", "pr.png", "overlay.png"):
        assert f"]({name})" in md
        check_png(out / name)
    # the first overlay (sorted) is copied byte for byte
    assert (out / "overlay.png").read_bytes() == repo["overlay"]
    assert "a_img.png" in md


@pytest.mark.slow
def test_default_base_is_merge_base_and_rev_compare(repo: dict[str, Any], tmp_path: Path) -> None:
    # workspace, default base: merge-base of feature with main = first commit
    md = build_report(out_dir=tmp_path / "a", repo=repo["root"], uri=f"sqlite:///{tmp_path}/none.db").read_text()
    assert f"Base: `{repo['first']}`" in md
    # explicit revisions: comparing the first commit with itself changes nothing
    md = build_report(
        base=repo["first"],
        rev=repo["first"],
        out_dir=tmp_path / "b",
        repo=repo["root"],
        uri=f"sqlite:///{tmp_path}/none.db",
    ).read_text()
    assert "No params changed." in section(md, "Params changed")
    deltas = [row[3] for row in parse_table(section(md, "Metrics"))[1:]]
    assert deltas and all(float(d) == 0 for d in deltas)
    assert not (tmp_path / "b" / "pr.png").exists()  # no pr.csv at either side
    assert "absent at new" in section(md, "Missing files")
    assert not (tmp_path / "b" / "overlay.png").exists()  # a commit has no overlays in git


def test_report_on_main_falls_back_to_parent(repo: dict[str, Any], tmp_path: Path) -> None:
    git(repo["root"], "checkout", "-q", "main")
    git(repo["root"], "merge", "-q", "--ff-only", "feature")
    md = build_report(
        rev="HEAD", out_dir=tmp_path / "c", repo=repo["root"], uri=f"sqlite:///{tmp_path}/none.db"
    ).read_text()
    assert f"Base: `{repo['first']}`" in md
    assert "Base defaulted to the parent commit" in md


@pytest.mark.slow
def test_report_shows_mlflow_runs_of_both_commits(
    repo: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vesselseg.tracking import RunLogger

    monkeypatch.setenv("VESSELSEG_TRACKING", "1")
    monkeypatch.chdir(repo["root"])
    uri = f"sqlite:///{tmp_path}/runs.db"
    for sha, dice in ((repo["first"], 0.71), (repo["second"], 0.76)):
        with RunLogger("evaluate", "rep", {"data.dataset": "synthetic"}, tags={"git_commit": sha}, uri=uri) as run:
            run.log_metrics({"test.dice": dice})
    md = build_report(base=repo["first"], out_dir=tmp_path / "d", repo=repo["root"], uri=uri).read_text()
    table = parse_table(section(md, "MLflow runs (newest run of each stage per commit)"))
    rows = {row[0]: row[1:] for row in table[1:]}
    assert [float(v) for v in rows["test.dice"]] == [0.71, 0.76]


def test_cli_report_prints_markdown(repo: dict[str, Any], tmp_path: Path) -> None:
    from vesselseg.cli_tools import report_cmd

    out = tmp_path / "pr-report"
    res = CliRunner().invoke(
        report_cmd,
        [
            "--base",
            repo["first"],
            "--out",
            str(out),
            "--repo",
            str(repo["root"]),
            "--uri",
            f"sqlite:///{tmp_path}/x.db",
        ],
    )
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == (out / "report.md").read_text().strip()  # logs go to stderr
    res = CliRunner().invoke(report_cmd, ["--base", "no-such-rev", "--out", str(out), "--repo", str(repo["root"])])
    assert res.exit_code != 0 and "no-such-rev" in str(res.exception)


def test_pr_workflow_calls_report() -> None:
    import yaml

    wf_path = Path(__file__).resolve().parents[1] / ".github" / "workflows" / "pr-report.yaml"
    wf = yaml.safe_load(wf_path.read_text())
    triggers = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` key as True
    assert "pull_request" in triggers
    steps = [s for job in wf["jobs"].values() for s in job["steps"]]
    runs = "\n".join(s.get("run", "") for s in steps)
    # the base ref goes through the environment, not a ${{ }} expression inside the script
    assert 'vesselseg report --base "origin/${GITHUB_BASE_REF}" --out pr-report' in runs
    checkout = next(s for s in steps if str(s.get("uses", "")).startswith("actions/checkout"))
    assert checkout["with"]["fetch-depth"] == 0
