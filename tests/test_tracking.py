"""RunLogger on a local SQLite store, repo-root detection, offline fallback and sync,
run tables and promotion.

One module-scoped git repository and one SQLite store are shared by most tests:
creating MLflow's tables costs seconds, and the tests only read what one logged
session wrote.  The real-server path is in ``test_mlflow_server.py``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

import vesselseg.tracking as tracking
from vesselseg.errors import DataError
from vesselseg.paths import artifact_root, default_tracking_uri, repo_root
from vesselseg.runs import promote, runs_table, side_by_side
from vesselseg.tracking import RunLogger, TrackingError, git_info, pending_offline, sync_offline

torch.set_num_threads(1)

PARAMS = {"train.lr": 0.001, "train.epochs": 7, "data.dataset": "synthetic", "model.depth": 3, "prepare.slab": None}
EPOCHS = 7
FLUSH_EVERY = 3


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def make_repo(root: Path) -> Path:
    root.mkdir(parents=True)
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.name", "Test")
    git(root, "config", "user.email", "test@example.com")
    (root / "params.yaml").write_text("train:\n  lr: 0.001\n")
    (root / "dvc.yaml").write_text(
        "stages:\n  evaluate:\n    cmd: x\n    metrics:\n    - reports/metrics.json:\n        cache: false\n"
    )
    (root / "reports").mkdir()
    (root / "reports" / "metrics.json").write_text('{"test": {"dice": 0.5}}\n')
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "first")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def tracking_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "vesselseg.tracking" and r.levelno >= logging.WARNING]


@pytest.fixture(autouse=True)
def _tracking_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VESSELSEG_TRACKING", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)


# ------------------------------------------------------------------ paths


def test_repo_root_inside_dvc_temp_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    copy = repo / ".dvc" / "tmp" / "exps" / "x" / "y"
    copy.mkdir(parents=True)
    (copy / "dvc.yaml").write_text("stages: {}\n")  # the copy has its own markers: must not stop there
    (repo / ".git").mkdir()
    assert repo_root(copy) == repo.resolve()
    assert repo_root(repo / ".dvc" / "tmp" / "exps") == repo.resolve()
    # walking up to the marker from a subfolder
    sub = repo / "src" / "pkg"
    sub.mkdir(parents=True)
    assert repo_root(sub) == repo.resolve()
    # DVC_ROOT pointing into the temp copy still gives the original root
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setenv("DVC_ROOT", str(copy))
    assert repo_root(elsewhere) == repo.resolve()
    monkeypatch.setenv("DVC_ROOT", str(sub))
    assert repo_root(elsewhere) == sub.resolve()


def test_default_uri_and_artifact_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "r"
    inner = repo / ".dvc" / "tmp" / "exps" / "run1"
    inner.mkdir(parents=True)
    monkeypatch.chdir(inner)
    assert default_tracking_uri() == f"sqlite:///{repo.resolve()}/mlflow.db"
    assert default_tracking_uri().startswith("sqlite:////")  # absolute: four slashes
    assert artifact_root() == repo.resolve() / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example.invalid:5000")
    assert default_tracking_uri() == "http://example.invalid:5000"


def test_git_info_ignores_dvc_outputs(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "g")
    sha, dirty = git_info(repo)
    assert sha == git(repo, "rev-parse", "HEAD") and len(sha) == 40
    assert dirty is False
    (repo / "reports" / "metrics.json").write_text('{"test": {"dice": 0.9}}\n')  # a stage output: not dirty
    assert git_info(repo)[1] is False
    (repo / "params.yaml").write_text("train:\n  lr: 0.01\n")  # a hand edit: dirty
    assert git_info(repo)[1] is True
    assert git_info(tmp_path) == ("unknown", False)  # not a repository


def test_disabled_switch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VESSELSEG_TRACKING", "0")
    uri = f"sqlite:///{tmp_path}/never.db"
    with RunLogger("train", "e", PARAMS, uri=uri, root=tmp_path) as run:
        run.log_metrics({"a": 1.0}, step=0)
        run.log_artifact(tmp_path / "does-not-matter")
    assert run.run_id is None and run.offline_dir is None
    assert not (tmp_path / "never.db").exists()


# ------------------------------------------------------- one logged session


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Log a train and an evaluate run from inside a fake DVC temp copy of a repo."""
    base = tmp_path_factory.mktemp("tracking")
    repo = make_repo(base / "repo")
    copy = repo / ".dvc" / "tmp" / "exps" / "tmpabc123"
    copy.mkdir(parents=True)
    model_file = copy / "model.pt"
    model_file.write_bytes(b"weights")
    artifact = copy / "notes.txt"
    artifact.write_text("hello\n")
    table = pd.DataFrame({"id": ["a", "b"], "dice": [0.5, 0.75]})
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(2, 1, 1))
    example = np.random.default_rng(0).random((1, 1, 16, 16), dtype=np.float32)

    sent: list[dict[str, Any]] = []
    real_apply = tracking._apply

    def spy(client: Any, run_id: str, op: dict[str, Any], base: Path | None = None) -> None:
        sent.append(op)
        real_apply(client, run_id, op, base)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VESSELSEG_TRACKING", "1")
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("DVC_ROOT", str(copy))
        mp.setenv("DVC_EXP_NAME", "exp-unit")
        mp.setenv("DVC_EXP_BASELINE_REV", git(repo, "rev-parse", "HEAD"))
        mp.chdir(copy)
        mp.setattr(tracking, "_apply", spy)
        with RunLogger("train", "unit", PARAMS, flush_every=FLUSH_EVERY, flush_seconds=3600) as train:
            for epoch in range(EPOCHS):
                train.log_metrics({"train_loss": 1.0 / (epoch + 1), "val_dice": epoch / 10}, step=epoch)
            train.log_artifact(artifact)
            train.log_table(table, "per_image")
            train.log_model(model_file, example, model=net)
        with RunLogger("evaluate", "unit", PARAMS) as ev:
            ev.log_metrics({"test.dice": 0.8, "test.auc_roc": 0.95})
    return {
        "repo": repo,
        "copy": copy,
        "uri": f"sqlite:///{repo}/mlflow.db",
        "train": train.run_id,
        "evaluate": ev.run_id,
        "sent": sent,
        "net": net,
        "example": example,
        "sha": git(repo, "rev-parse", "HEAD"),
    }


def test_store_lands_in_original_root(session: dict[str, Any]) -> None:
    repo, copy = session["repo"], session["copy"]
    assert (repo / "mlflow.db").is_file()
    assert not (copy / "mlflow.db").exists() and not (copy / "mlruns").exists()
    exp = client(session["uri"]).get_experiment_by_name("unit")
    assert exp.artifact_location == (repo / "mlruns").as_uri()
    run = client(session["uri"]).get_run(session["train"])
    assert run.info.artifact_uri.startswith((repo / "mlruns").as_uri())


def test_params_tags_and_status(session: dict[str, Any]) -> None:
    run = client(session["uri"]).get_run(session["train"])
    assert run.data.params == {
        "train.lr": "0.001",
        "train.epochs": "7",
        "data.dataset": "synthetic",
        "model.depth": "3",
        "prepare.slab": "None",
    }
    tags = run.data.tags
    assert tags["git_commit"] == session["sha"]
    assert tags["git_dirty"] == "false"
    assert tags["dvc_exp_name"] == "exp-unit"
    assert tags["dvc_exp_baseline_rev"] == session["sha"]
    assert tags["stage"] == "train" and tags["dataset"] == "synthetic" and tags["recipe"] == "default"
    assert run.info.status == "FINISHED" and run.info.end_time >= run.info.start_time
    assert client(session["uri"]).get_run(session["evaluate"]).data.tags["stage"] == "evaluate"


def test_metric_history_and_batching(session: dict[str, Any]) -> None:
    c = client(session["uri"])
    for key, expect in (("train_loss", lambda e: 1.0 / (e + 1)), ("val_dice", lambda e: e / 10)):
        hist = sorted((m.step, m.value) for m in c.get_metric_history(session["train"], key))
        assert [s for s, _ in hist] == list(range(EPOCHS))
        np.testing.assert_allclose([v for _, v in hist], [expect(e) for e in range(EPOCHS)])
    # 2 values per epoch, a flush whenever >= FLUSH_EVERY are buffered, one at close
    train_keys = {"train_loss", "val_dice"}
    metric_ops = [
        op for op in session["sent"] if op["op"] == "batch" and {m[0] for m in op.get("metrics", [])} & train_keys
    ]
    sizes = [len(op["metrics"]) for op in metric_ops]
    expected, buf = [], 0
    for _ in range(EPOCHS):
        buf += 2
        if buf >= FLUSH_EVERY:
            expected.append(buf)
            buf = 0
    expected += [buf] if buf else []
    assert sizes == expected and sum(sizes) == 2 * EPOCHS


def test_artifacts_table_and_model(session: dict[str, Any], tmp_path: Path) -> None:
    c = client(session["uri"])
    rid = session["train"]
    top = {a.path for a in c.list_artifacts(rid)}
    assert {"notes.txt", "tables", "model_file", "model"} <= top
    assert Path(c.download_artifacts(rid, "notes.txt", str(tmp_path))).read_text() == "hello\n"
    table = pd.read_csv(c.download_artifacts(rid, "tables/per_image.csv", str(tmp_path)))
    pd.testing.assert_frame_equal(table, pd.DataFrame({"id": ["a", "b"], "dice": [0.5, 0.75]}))
    assert Path(c.download_artifacts(rid, "model_file/model.pt", str(tmp_path))).read_bytes() == b"weights"
    import mlflow.pytorch

    loaded = mlflow.pytorch.load_model(f"{c.get_run(rid).info.artifact_uri}/model")
    x = torch.rand(2, 1, 24, 20)  # another size than the example: a segmenter takes any size
    with torch.no_grad():
        np.testing.assert_allclose(loaded(x).numpy(), session["net"](x).numpy(), rtol=1e-5, atol=1e-6)
    assert c.get_run(rid).data.tags[tracking.MODEL_TAG] == "model"


def test_missing_artifact_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VESSELSEG_TRACKING", "1")
    run = RunLogger.__new__(RunLogger)  # no store needed: the check comes first
    run.disabled = False
    with pytest.raises(DataError, match="nope.txt"):
        RunLogger.log_artifact(run, tmp_path / "nope.txt")


def test_runs_table_side_by_side_and_promote(session: dict[str, Any]) -> None:
    uri = session["uri"]
    other = "f" * 40
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(session["repo"])
        with RunLogger(
            "evaluate",
            "unit",
            {**PARAMS, "data.dataset": "drive", "train.lr": 0.01},
            tags={"git_commit": other},
            uri=uri,
        ) as r:
            r.log_metrics({"test.dice": 0.7})
    df = runs_table(uri=uri)
    assert len(df) == 3
    assert set(df["git_commit"]) == {session["sha"][:8], other[:8]}
    assert "params.train.lr" in df.columns and "params.data.dataset" in df.columns  # varying -> shown
    assert "params.model.depth" in df.columns  # a key param
    assert "params.prepare.slab" not in df.columns  # constant, not key
    only = runs_table(uri=uri, dataset="drive")
    assert list(only["run_id"]) == [r.run_id]
    ranked = runs_table("unit", uri=uri, sort_by="test.dice")
    assert list(ranked["metrics.test.dice"].iloc[:2]) == [0.8, 0.7]
    assert len(runs_table(uri=uri, commit=session["sha"][:7])) == 2

    sbs = side_by_side([session["sha"], other], uri=uri)
    assert list(sbs.columns) == [session["sha"][:8], other[:8]]
    assert sbs.loc["test.dice"].tolist() == [0.8, 0.7]
    assert sbs.loc["val_dice", session["sha"][:8]] == pytest.approx((EPOCHS - 1) / 10)
    assert np.isnan(sbs.loc["val_dice", other[:8]])

    # promote: the evaluate run's metric decides, the train run of the commit gives the model
    first = promote(session["evaluate"], name="vs-unit", uri=uri)
    assert first.promoted and first.version == "1"
    c = client(uri)
    holder = c.get_model_version_by_alias("vs-unit", "champion")
    assert str(holder.version) == "1" and holder.run_id == session["train"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(session["repo"])
        with RunLogger("evaluate", "unit", PARAMS, uri=uri) as worse:
            worse.log_metrics({"test.dice": 0.6})
        with RunLogger("evaluate", "unit", PARAMS, uri=uri) as better:
            better.log_metrics({"test.dice": 0.9})
    second = promote(worse.run_id, name="vs-unit", uri=uri)
    assert not second.promoted and "does not beat" in second.message
    assert str(c.get_model_version_by_alias("vs-unit", "champion").version) == "1"
    third = promote(better.run_id, name="vs-unit", uri=uri)
    assert third.promoted and str(c.get_model_version_by_alias("vs-unit", "champion").version) == "2"
    with pytest.raises(TrackingError, match="not logged"):
        promote(better.run_id, name="vs-unit", metric="test.nope", uri=uri)

    # the CLI takes the registered model's name from params.yaml's tracking.experiment
    from click.testing import CliRunner

    from vesselseg.cli_tools import promote_cmd

    params_file = session["repo"] / "cli-params.yaml"
    params_file.write_text("tracking:\n  experiment: vs-cli\n")
    res = CliRunner().invoke(promote_cmd, [session["evaluate"], "--params", str(params_file), "--uri", uri])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("promoted: vs-cli version 1 is now @champion")
    res = CliRunner().invoke(promote_cmd, [worse.run_id, "--params", str(params_file), "--uri", uri])
    assert res.exit_code == 0 and res.output.startswith("not promoted")
    res = CliRunner().invoke(
        promote_cmd, [worse.run_id, "--params", str(params_file), "--uri", uri, "--lower-is-better"]
    )
    assert res.exit_code == 0 and res.output.startswith("promoted: vs-cli version 2")


# -------------------------------------------------------------- offline


@pytest.mark.slow
def test_server_down_offline_then_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_repo(tmp_path / "proj")
    monkeypatch.chdir(root)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    (root / "curve.csv").write_text("x,y\n0,1\n")
    with RunLogger("train", "off", PARAMS, uri=dead, flush_every=2) as run:
        for epoch in range(12):  # a training-like loop that must simply carry on
            run.log_metrics({"loss": 10.0 - epoch}, step=epoch)
        run.log_artifact(root / "curve.csv", "plots")
    assert len(tracking_warnings(caplog)) == 1
    assert run.run_id is None
    journal = run.offline_dir
    assert journal is not None and journal.parent == root / ".mlflow-offline"
    meta = json.loads((journal / "run.json").read_text())
    assert meta["tags"]["git_commit"] == git(root, "rev-parse", "HEAD")
    n_ops = len(list((journal / "ops").glob("*.json")))
    assert n_ops >= 1 + 6 + 1 + 1  # params, 6 metric batches, artifact, end

    # a sync with the server still down keeps everything
    with pytest.raises(TrackingError, match="does not answer"):
        sync_offline(dead, root=root)
    assert len(list((journal / "ops").glob("*.json"))) == n_ops

    # a sync interrupted after 3 operations deletes exactly those, and resumes later
    target = f"sqlite:///{tmp_path}/synced.db"
    real_apply = tracking._apply
    calls = {"n": 0}

    def flaky(client: Any, run_id: str, op: dict[str, Any], base: Path | None = None) -> None:
        calls["n"] += 1
        if calls["n"] == 4:
            raise ConnectionError("server went away again")
        real_apply(client, run_id, op, base)

    monkeypatch.setattr(tracking, "_apply", flaky)
    with pytest.raises(TrackingError, match="rerun to resume"):
        sync_offline(target, root=root)
    assert len(list((journal / "ops").glob("*.json"))) == n_ops - 3
    first_id = json.loads((journal / "run.json").read_text())["run_id"]
    assert first_id

    assert sync_offline(target, root=root) == 1
    assert pending_offline(root) == [] and not journal.exists()
    c = client(target)
    exp = c.get_experiment_by_name("off")
    runs = c.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [first_id]  # resumed into the same run
    got = runs[0]
    assert got.info.status == "FINISHED"
    assert got.info.start_time == meta["start_time"]
    assert got.data.params["train.lr"] == "0.001"
    assert got.data.tags["stage"] == "train"
    hist = sorted((m.step, m.value) for m in c.get_metric_history(first_id, "loss"))
    assert hist == [(e, 10.0 - e) for e in range(12)]
    assert Path(c.download_artifacts(first_id, "plots/curve.csv", str(tmp_path))).read_text() == "x,y\n0,1\n"
    assert sync_offline(target, root=root) == 0  # nothing left


def test_cli_runs_and_sync(session: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from vesselseg.cli_tools import runs_cmd, tracking_group

    res = CliRunner().invoke(
        runs_cmd, ["--uri", session["uri"], "--experiment", "unit", "--csv", "--sort", "test.dice"]
    )
    assert res.exit_code == 0, res.output
    table = pd.read_csv(io.StringIO(res.output))
    assert table["metrics.test.dice"].iloc[0] == table["metrics.test.dice"].max()
    assert set(table["stage"]) == {"train", "evaluate"}
    res = CliRunner().invoke(runs_cmd, ["--uri", session["uri"], "--dataset", "synthetic"])
    assert res.exit_code == 0 and res.output.startswith("| run_id |")
    res = CliRunner().invoke(runs_cmd, ["--uri", session["uri"], "--sort", "no.such.metric"])
    assert res.exit_code != 0 and "no.such.metric" in str(res.exception)
    monkeypatch.chdir(session["repo"])
    res = CliRunner().invoke(tracking_group, ["sync", "--uri", session["uri"]])
    assert res.exit_code == 0 and "synced 0 offline run(s); 0 left" in res.output


def test_cli_commands_registered() -> None:
    from vesselseg.cli_tools import COMMANDS

    names = {c.name for c in COMMANDS}
    assert names == {"runs", "report", "tracking", "promote"}
    tracking_group = next(c for c in COMMANDS if c.name == "tracking")
    assert "sync" in tracking_group.commands  # type: ignore[attr-defined]
    assert os.environ.get("VESSELSEG_TRACKING") == "1"
