"""RunLogger against a real ``mlflow server``: the server dying mid-run, and artifacts
that go through the server (``mlflow-artifacts:``) so another client can read them.

The server is started in its own session (process group) because it spawns worker
and consumer processes; teardown kills the whole group so nothing is left behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.helpers import ROOT, make_prepared
from vesselseg.tracking import (
    RunLogger,
    artifact_location,
    pending_offline,
    sync_offline,
)

ROOT_PARAMS = {"train.lr": 0.001, "data.dataset": "synthetic", "model.depth": 3}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` on a SQLite file; ``start()`` waits for ``/health``."""

    def __init__(self, db: Path, workdir: Path) -> None:
        self.db = db
        self.workdir = workdir
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 90.0) -> MlflowServer:
        self.port = free_port()
        self.workdir.mkdir(parents=True, exist_ok=True)
        logf = open(self.workdir / f"server-{self.port}.log", "wb")  # noqa: SIM115 - lives as long as the server
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.db}",
            # artifacts are proxied: clients upload to the server, which stores them here
            "--serve-artifacts", "--artifacts-destination", str(self.workdir / "served-artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        # No background job consumer: fewer processes to start and to kill.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(
            cmd, cwd=self.workdir, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited early: {(self.workdir / logf.name).read_text()[-2000:]}")
            try:
                if requests.get(self.uri + "/health", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer /health within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        # the group may still hold children after the leader exited
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake project root (``dvc.yaml`` marks it) used as cwd."""
    root = tmp_path / "proj"
    root.mkdir()
    (root / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(root)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.setenv("VESSELSEG_TRACKING", "1")
    return root


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _tracking_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "vesselseg.tracking" and r.levelno == logging.WARNING]


# Two server starts: about 10 s each on an idle machine, up to a minute each when
# the machine is shared; 240 s leaves room without letting a hang run forever.
@pytest.mark.timeout(240)
@pytest.mark.slow
def test_server_logging_and_midrun_loss(project: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "server.db"
    server = MlflowServer(db, tmp_path / "srv").start()
    try:
        # 1) a normal run over HTTP
        with RunLogger("train", "srv-exp", ROOT_PARAMS, tags={"recipe": "r1"}, uri=server.uri, flush_every=4) as run:
            for epoch in range(6):
                run.log_metrics({"train_loss": 1.0 / (epoch + 1), "val_dice": 0.1 * epoch}, step=epoch)
        assert run.run_id is not None and run.offline_dir is None
        got = _client(server.uri).get_run(run.run_id)
        assert got.data.params["train.lr"] == "0.001"
        assert got.data.params["model.depth"] == "3"
        assert got.data.tags["stage"] == "train"
        assert got.data.tags["dataset"] == "synthetic"
        assert got.data.tags["recipe"] == "r1"
        assert got.info.status == "FINISHED"
        hist = _client(server.uri).get_metric_history(run.run_id, "val_dice")
        assert sorted((m.step, round(m.value, 6)) for m in hist) == [(e, round(0.1 * e, 6)) for e in range(6)]
        assert not _tracking_warnings(caplog)

        # 2) the server dies while a run is open: logging carries on, one warning
        artifact = project / "late.txt"
        artifact.write_text("written after the server died\n")
        with RunLogger("train", "srv-exp", ROOT_PARAMS, uri=server.uri, flush_every=1) as run2:
            for epoch in range(3):
                run2.log_metrics({"loss": float(epoch)}, step=epoch)
            server.stop()
            t0 = time.monotonic()
            for epoch in range(3, 10):
                run2.log_metrics({"loss": float(epoch)}, step=epoch)
            run2.log_artifact(artifact)
            assert time.monotonic() - t0 < 20, "a dead server must not stall training"
        assert len(_tracking_warnings(caplog)) == 1
        assert run2.offline_dir is not None and run2.offline_dir.is_dir()
        assert pending_offline(project) == [run2.offline_dir]
    finally:
        server.stop()

    # 3) restart on the same database, replay: nothing lost, the same run completed
    server2 = MlflowServer(db, tmp_path / "srv2").start()
    try:
        assert sync_offline(server2.uri) == 1
        assert pending_offline(project) == []
        client = _client(server2.uri)
        got = client.get_run(run2.run_id)
        assert got.info.status == "FINISHED"
        steps = sorted((m.step, m.value) for m in client.get_metric_history(run2.run_id, "loss"))
        assert steps == [(e, float(e)) for e in range(10)]
        names = [a.path for a in client.list_artifacts(run2.run_id)]
        assert "late.txt" in names
        local = client.download_artifacts(run2.run_id, "late.txt", str(tmp_path))
        assert Path(local).read_text() == "written after the server died\n"
        # only one run per RunLogger: the replay reused the id, it did not duplicate
        exp = client.get_experiment_by_name("srv-exp")
        assert len(client.search_runs([exp.experiment_id])) == 2
    finally:
        server2.stop()


def test_artifact_location_goes_through_an_http_server(tmp_path: Path) -> None:
    assert artifact_location("http://mlflow.example:5000", "vessel seg") == "mlflow-artifacts:/vessel%20seg"
    assert artifact_location("https://mlflow.example", "vesselseg") == "mlflow-artifacts:/vesselseg"
    local = artifact_location(f"sqlite:///{tmp_path}/mlflow.db", "vesselseg", tmp_path)
    assert local.startswith("file://") and local.endswith("/mlruns")


# the train stage on 4 tiny images (a few seconds) plus one server start
@pytest.mark.timeout(240)
@pytest.mark.slow
def test_train_stage_artifact_is_readable_from_a_second_client_directory(tmp_path: Path) -> None:
    """The train stage run against a server: its history.csv artifact is on the server,
    not on the training client's disk, and a client in another folder downloads it intact."""
    import yaml

    from vesselseg.params import Params, set_dotted

    server = MlflowServer(tmp_path / "server.db", tmp_path / "srv").start()
    try:
        client_a = tmp_path / "client-a"
        make_prepared(client_a / "prepared", n_train=3, n_val=1, n_test=1, size=32)
        tree = Params().model_dump(mode="json")
        tiny = {
            "patches.size": 16,
            "patches.per_image": 8,
            "patches.val_per_image": 4,
            "model.depth": 2,
            "model.base_channels": 4,
            "train.epochs": 1,
            "train.batch_size": 8,
            "train.threads": 1,
            "tracking.experiment": "served",
        }
        for key, value in tiny.items():
            set_dotted(tree, key, value)
        (client_a / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
        (client_a / "dvc.yaml").write_text("stages: {}\n")  # marks the project root
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": server.uri,
            "VESSELSEG_TRACKING": "1",
            "VESSELSEG_THREADS": "1",
            "NO_ALBUMENTATIONS_UPDATE": "1",
            "PYTHONPATH": str(ROOT / "src"),
        }
        env.pop("DVC_ROOT", None)
        cli = [sys.executable, "-m", "vesselseg.cli", "--params", "params.yaml"]
        for argv in (
            ["patches", "--prepared", "prepared", "--out", "patches"],
            [
                "train",
                "--patches",
                "patches",
                "--prepared",
                "prepared",
                "--model",
                "model.pt",
                "--checkpoint",
                "checkpoint.pt",
                "--history",
                "history.csv",
                "--metrics",
                "train.json",
            ],
        ):
            res = subprocess.run([*cli, *argv], cwd=client_a, env=env, capture_output=True, text=True, timeout=180)
            assert res.returncode == 0, res.stderr[-2000:]
        assert not (client_a / "mlruns").exists(), "artifacts must not land on the training client's disk"

        client = _client(server.uri)
        exp = client.get_experiment_by_name("served")
        assert exp.artifact_location.startswith("mlflow-artifacts:")
        (train_run,) = client.search_runs([exp.experiment_id], "tags.stage = 'train'")
        assert train_run.info.artifact_uri.startswith("mlflow-artifacts:")
        client_b = tmp_path / "client-b"
        client_b.mkdir()
        got = client.download_artifacts(train_run.info.run_id, "history.csv", str(client_b))
        assert Path(got).read_bytes() == (client_a / "history.csv").read_bytes()
        assert list((tmp_path / "srv" / "served-artifacts").rglob("history.csv")), "stored by the server"
    finally:
        server.stop()
