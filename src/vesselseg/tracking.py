"""MLflow run logging that never stops training.

The train and evaluate stages log through :class:`RunLogger`.  Every logging call is
turned into one small *operation* (a batch of metrics/params/tags, an artifact, the
end of the run).  While the tracking server answers, operations go straight to it;
the first time it does not (down at start, or gone mid-run), one warning is logged
and this and every later operation is appended to a journal under
``<root>/.mlflow-offline/<uuid>/``.  :func:`sync_offline` later replays each journal
through the very same code path, deleting every operation file only after the
server accepted it, so an interrupted sync resumes where it stopped and nothing is
lost or logged twice.

Why our own journal rather than MLflow's async logging: async logging still needs
the server to come back within the same process, and loses its queue on exit.

mlflow is imported lazily (about 2 s), and ``VESSELSEG_TRACKING=0`` turns every
call into a no-op for tight unit tests.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlparse

import yaml

from vesselseg import atomic
from vesselseg.errors import DataError, VesselsegError
from vesselseg.paths import artifact_root, default_tracking_uri, git, offline_root, repo_root

if TYPE_CHECKING:  # pragma: no cover - typing only
    import numpy as np
    import pandas as pd
    import torch

log = logging.getLogger(__name__)

__all__ = [
    "RunLogger",
    "TrackingError",
    "artifact_location",
    "git_info",
    "pending_offline",
    "run_tags",
    "server_reachable",
    "sync_offline",
    "tracking_disabled",
]

ENV_SWITCH = "VESSELSEG_TRACKING"
MODEL_FILE_DIR = "model_file"
MODEL_DIR = "model"
MODEL_TAG = "vesselseg.model_artifact"

# MLflow's log_batch limits per call.
_MAX_METRICS = 1000
_MAX_PARAMS = 100
_MAX_TAGS = 100


class TrackingError(VesselsegError):
    """The tracking server or store cannot be used for an explicit request (sync, promote)."""


def tracking_disabled() -> bool:
    """``VESSELSEG_TRACKING=0`` (or false/no/off) switches all run logging off."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() in {"0", "false", "no", "off"}


def _now_ms() -> int:
    return int(time.time() * 1000)


# --------------------------------------------------------------------------- git


def _dvc_outputs(top: Path) -> set[str]:
    """Paths DVC stages write (outs/metrics/plots) plus dvc.lock.

    A stage rewrites its own committed outputs (``cache: false`` metrics) while it
    runs, so counting them would mark every run dirty; only hand edits count.
    """
    found = {"dvc.lock"}
    try:
        spec = yaml.safe_load((top / "dvc.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return found

    def add(entries: Any) -> None:
        for entry in entries or []:
            if isinstance(entry, str):
                found.add(entry.rstrip("/"))
            elif isinstance(entry, dict):
                found.update(str(k).rstrip("/") for k in entry)

    for stage in (spec.get("stages") or {}).values():
        if isinstance(stage, dict):
            for key in ("outs", "metrics", "plots"):
                add(stage.get(key))
    add(spec.get("metrics"))
    add([p for p in spec.get("plots") or [] if isinstance(p, str)])
    return found


def git_info(cwd: Path | None = None) -> tuple[str, bool]:
    """Full sha of HEAD and whether tracked files differ from it (DVC outputs excluded).

    Returns ``("unknown", False)`` outside a git repository.
    """
    cwd = Path(cwd or Path.cwd())
    sha = git(cwd, "rev-parse", "HEAD")
    if not sha:
        return "unknown", False
    top = Path((git(cwd, "rev-parse", "--show-toplevel") or str(cwd)).strip())
    status = git(top, "status", "--porcelain=v1", "-z", "--untracked-files=no") or ""
    outs = _dvc_outputs(top)
    dirty = False
    entries = status.split("\0")
    i = 0
    while i < len(entries):
        entry = entries[i]
        i += 1
        if len(entry) < 4:
            continue
        if entry[0] in "RC":  # rename/copy: the original path follows as its own entry
            i += 1
        path = entry[3:]
        if not any(path == o or path.startswith(o + "/") for o in outs):
            dirty = True
            break
    return sha.strip(), dirty


def run_tags(stage: str, params: Mapping[str, Any], cwd: Path | None = None) -> dict[str, str]:
    """The tags every vesselseg run carries, so runs can be found by commit, experiment and dataset."""
    sha, dirty = git_info(cwd)
    tags = {
        "git_commit": sha,
        "git_dirty": str(dirty).lower(),
        "mlflow.source.git.commit": sha,
        "stage": stage,
        "dataset": str(params.get("data.dataset", "unknown")),
        "recipe": str(params.get("recipe") or params.get("recipe.name") or "default"),
    }
    for env, tag in (("DVC_EXP_NAME", "dvc_exp_name"), ("DVC_EXP_BASELINE_REV", "dvc_exp_baseline_rev")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


# ----------------------------------------------------------------- server probe


def _configure_http(timeout_s: int, retries: int) -> None:
    """Short HTTP timeouts so a dead server costs seconds, not MLflow's default minutes.

    Values the user already exported win.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(timeout_s)))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(int(retries)))


def server_reachable(uri: str, timeout_s: float = 3.0) -> bool:
    """``GET <uri>/health`` for HTTP servers; other stores (sqlite, files) count as reachable."""
    if not uri.startswith(("http://", "https://")):
        return True
    import requests  # mlflow depends on it; imported here to keep module import cheap

    try:
        resp = requests.get(uri.rstrip("/") + "/health", timeout=timeout_s)
    except requests.RequestException as err:
        log.debug("health probe of %s failed: %s", uri, err)
        return False
    return resp.status_code == 200


# ------------------------------------------------------------------ operations


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def artifact_location(uri: str, experiment: str, root: Path | None = None) -> str:
    """Where the artifacts of an experiment we create go.

    With an http(s) tracking URI: ``mlflow-artifacts:/<experiment>``, i.e. uploaded to
    the server, which stores them in its ``--artifacts-destination``.  Why: a
    ``file://`` location would make each client write artifacts onto its own disk,
    where the server and every other client cannot read them.  Otherwise (the local
    SQLite store): ``<repo root>/mlruns`` beside the database, outside any temp copy.
    """
    if urlparse(uri).scheme in ("http", "https"):
        return f"mlflow-artifacts:/{quote(experiment, safe='')}"
    return artifact_root(root).as_uri()


def _experiment_id(client: Any, name: str, artifact_location: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        served = artifact_location.startswith("mlflow-artifacts:")
        if served and urlparse(exp.artifact_location).scheme in ("", "file"):
            log.warning(
                "MLflow experiment %r keeps its artifacts at %s (created by a client without the server's"
                " artifact proxy); set tracking.experiment to a new name to send them through the server",
                name,
                exp.artifact_location,
            )
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # another process created it between our two calls
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _create_run(client: Any, meta: Mapping[str, Any]) -> str:
    exp_id = _experiment_id(client, meta["experiment"], meta["artifact_location"])
    run = client.create_run(exp_id, start_time=meta["start_time"], tags=dict(meta["tags"]), run_name=meta["run_name"])
    return run.info.run_id


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _apply(client: Any, run_id: str, op: Mapping[str, Any], base: Path | None = None) -> None:
    """Send one operation to MLflow; ``base`` resolves journal-relative artifact paths."""
    kind = op["op"]
    if kind == "batch":
        from mlflow.entities import Metric, Param, RunTag

        metrics = [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in op.get("metrics", [])]
        params = [Param(k, v) for k, v in op.get("params", {}).items()]
        tags = [RunTag(k, v) for k, v in op.get("tags", {}).items()]
        for chunk in _chunks(params, _MAX_PARAMS):
            client.log_batch(run_id, params=chunk)
        for chunk in _chunks(tags, _MAX_TAGS):
            client.log_batch(run_id, tags=chunk)
        for chunk in _chunks(metrics, _MAX_METRICS):
            client.log_batch(run_id, metrics=chunk)
    elif kind == "artifact":
        local = Path(op["local"])
        if base is not None and not local.is_absolute():
            local = base / local
        if local.is_dir():
            client.log_artifacts(run_id, str(local), op.get("artifact_path"))
        else:
            client.log_artifact(run_id, str(local), op.get("artifact_path"))
    elif kind == "end":
        client.set_terminated(run_id, status=op["status"], end_time=op["end_time"])
    else:
        raise TrackingError(f"unknown offline operation {kind!r}")


# -------------------------------------------------------------- offline journal


class _Journal:
    """One offline run: ``run.json`` (how to create it) plus numbered operation files."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ops = folder / "ops"
        self.files = folder / "files"

    @classmethod
    def create(cls, root: Path, meta: Mapping[str, Any]) -> _Journal:
        folder = root / uuid.uuid4().hex
        journal = cls(folder)
        journal.ops.mkdir(parents=True)
        journal.files.mkdir()
        atomic.write_json(folder / "run.json", dict(meta))
        return journal

    @property
    def meta(self) -> dict[str, Any]:
        return json.loads((self.folder / "run.json").read_text())

    def set_run_id(self, run_id: str) -> None:
        meta = self.meta
        meta["run_id"] = run_id
        atomic.write_json(self.folder / "run.json", meta)

    def pending(self) -> list[Path]:
        return sorted(self.ops.glob("*.json"))

    def append(self, op: dict[str, Any]) -> None:
        n = len(list(self.ops.glob("*.json"))) + len(list(self.files.iterdir()))
        name = f"{time.time_ns():020d}-{n:06d}-{op['op']}"
        if op["op"] == "artifact":
            # Copy now: the source (a temp table, a model file a later stage rewrites)
            # may be gone or different by the time the journal is synced.
            src = Path(op["local"])
            dest = self.files / name / src.name
            dest.parent.mkdir(parents=True)
            if src.is_dir():
                shutil.copytree(src, dest)
            else:
                shutil.copy2(src, dest)
            op = {**op, "local": dest.relative_to(self.folder).as_posix()}
        atomic.write_json(self.ops / f"{name}.json", op)


# ------------------------------------------------------------------- RunLogger


class RunLogger:
    """One MLflow run of one stage, usable as a context manager.

    ``params`` are the flattened dotted params (``train.lr``); ``tags`` override the
    derived ones (git commit, dirty flag, DVC experiment, stage, dataset, recipe).
    Metrics are buffered and sent with ``log_batch`` every ``flush_every`` values or
    ``flush_seconds``, so per-epoch logging costs one request, not one per value.
    ``run_id`` is the MLflow run id, or ``None`` when tracking is disabled or the
    server was unreachable from the start (the run then lives in ``offline_dir``).
    """

    def __init__(
        self,
        stage: str,
        experiment: str,
        params: Mapping[str, Any],
        tags: Mapping[str, Any] | None = None,
        *,
        uri: str | None = None,
        root: Path | None = None,
        run_name: str | None = None,
        flush_every: int = 100,
        flush_seconds: float = 15.0,
        http_timeout_s: int = 10,
        http_retries: int = 0,
        probe_timeout_s: float = 3.0,
    ) -> None:
        self.stage = stage
        self.experiment = experiment
        self.params = {str(k): v for k, v in params.items()}
        self.disabled = tracking_disabled()
        self.root = repo_root(root)
        self.uri = uri or default_tracking_uri(self.root)
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self.run_id: str | None = None
        self._client: Any = None
        self._journal: _Journal | None = None
        self._buffer: list[list[Any]] = []
        self._last_flush = time.monotonic()
        self._closed = False
        if self.disabled:
            log.debug("tracking disabled by %s", ENV_SWITCH)
            return
        _configure_http(http_timeout_s, http_retries)
        all_tags = run_tags(stage, self.params)
        all_tags.update({str(k): str(v) for k, v in (tags or {}).items()})
        short = all_tags["git_commit"][:8]
        self._meta: dict[str, Any] = {
            "experiment": experiment,
            "artifact_location": artifact_location(self.uri, experiment, self.root),
            "start_time": _now_ms(),
            "tags": all_tags,
            "run_name": run_name or f"{stage}-{all_tags.get('dvc_exp_name', short)}",
            "run_id": None,
            "tracking_uri": self.uri,
        }
        self._start(probe_timeout_s)
        self._send({"op": "batch", "params": {k: _param_value(v) for k, v in self.params.items()}})

    # -- plumbing

    def _start(self, probe_timeout_s: float) -> None:
        if not server_reachable(self.uri, probe_timeout_s):
            self._go_offline(f"{self.uri}/health does not answer")
            return
        try:
            client = _client(self.uri)
            self.run_id = _create_run(client, self._meta)
            self._client = client
            log.info("MLflow run %s (%s) in experiment %r at %s", self.run_id, self.stage, self.experiment, self.uri)
        except Exception as err:  # any store failure must not stop the stage
            self._go_offline(f"{type(err).__name__}: {_first_line(err)}")

    def _go_offline(self, reason: str) -> None:
        meta = {**self._meta, "run_id": self.run_id}
        self._journal = _Journal.create(offline_root(self.root), meta)
        self._client = None
        log.warning(
            "MLflow tracking at %s unavailable (%s); recording run offline in %s; replay later with "
            "`vesselseg tracking sync`",
            self.uri,
            reason,
            self._journal.folder,
        )

    def _send(self, op: dict[str, Any]) -> None:
        if self._client is not None:
            try:
                _apply(self._client, self.run_id, op)  # type: ignore[arg-type]
                return
            except Exception as err:
                self._go_offline(f"{type(err).__name__}: {_first_line(err)}")
        if self._journal is None:  # unreachable: without a client the run is always journalled
            raise TrackingError("internal: run has neither a tracking client nor an offline journal")
        self._journal.append(op)

    @property
    def offline_dir(self) -> Path | None:
        """The journal folder once the run went offline, else ``None``."""
        return None if self._journal is None else self._journal.folder

    # -- public logging API

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Buffer ``metrics`` at ``step`` (default 0); sent in batches."""
        if self.disabled:
            return
        ts = _now_ms()
        for key, value in metrics.items():
            self._buffer.append([str(key), float(value), ts, int(step or 0)])
        if len(self._buffer) >= self.flush_every or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Extra params discovered at run time (e.g. the resolved device)."""
        if not self.disabled:
            self._send({"op": "batch", "params": {str(k): _param_value(v) for k, v in params.items()}})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.disabled:
            self._send({"op": "batch", "tags": {str(k): str(v) for k, v in tags.items()}})

    def flush(self) -> None:
        """Send buffered metrics now."""
        self._last_flush = time.monotonic()
        if self.disabled or not self._buffer:
            return
        batch, self._buffer = self._buffer, []
        self._send({"op": "batch", "metrics": batch})

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        """Log a file or a whole folder under ``artifact_path``."""
        if self.disabled:
            return
        path = Path(path)
        if not path.exists():
            raise DataError(f"{path}: artifact to log does not exist")
        self._send({"op": "artifact", "local": str(path.resolve()), "artifact_path": artifact_path})

    def log_table(self, df: pd.DataFrame, name: str) -> None:
        """Log ``df`` as ``tables/<name>.csv``: plain CSV opens anywhere, offline too."""
        if self.disabled:
            return
        stem = name[:-4] if name.endswith(".csv") else name
        with tempfile.TemporaryDirectory(prefix="vesselseg-table-") as tmp:
            path = Path(tmp) / f"{stem}.csv"
            df.to_csv(path, index=False)
            self.log_artifact(path, "tables")

    def log_model(
        self,
        path: Path | str,
        input_example: np.ndarray | None = None,
        *,
        model: torch.nn.Module | None = None,
    ) -> None:
        """Log the model file, and an MLflow model that can be registered and served.

        The file goes to ``model_file/``.  A vesselseg model file that carries its
        preprocessing spec becomes a pyfunc model in ``model/``
        (:mod:`vesselseg.mlflow_model`: uint8 image in, probability map out, with
        signature and input example; ``input_example`` is then an image); the run is
        tagged with the file's SHA-256 so an evaluate run can be linked to it by
        content.  Otherwise, given ``input_example`` (N, C, H, W) or (C, H, W), the
        network (``model``, else rebuilt with ``vesselseg.models.load_model``) is saved
        with ``mlflow.pytorch.save_model``.  The MLflow model is optional: any failure
        there is one warning, never an error, and pip requirements are pinned rather
        than inferred (inference spawns a subprocess and takes seconds).
        """
        if self.disabled:
            return
        path = Path(path)
        self.log_artifact(path, MODEL_FILE_DIR)
        from vesselseg.mlflow_model import MODEL_SHA_TAG, file_sha256

        self.set_tags({MODEL_SHA_TAG: file_sha256(path)})
        spec = _preprocessing_spec_of(path)
        if spec is None and input_example is None:
            return
        with tempfile.TemporaryDirectory(prefix="vesselseg-mlmodel-") as tmp:
            try:
                if spec is not None:
                    from vesselseg.mlflow_model import save_vesselseg_model

                    saved = save_vesselseg_model(path, Path(tmp) / MODEL_DIR, input_example)
                else:
                    saved = _save_pytorch_model(path, input_example, model, Path(tmp) / MODEL_DIR)  # type: ignore[arg-type]
            except Exception as err:  # optional extra: report, do not fail the stage
                log.warning(
                    "MLflow model not logged (%s); model file logged under %s/", _first_line(err), MODEL_FILE_DIR
                )
                return
            self._send({"op": "artifact", "local": str(saved), "artifact_path": MODEL_DIR})
        self.set_tags({MODEL_TAG: MODEL_DIR})

    # -- lifecycle

    def close(self, status: str = "FINISHED") -> None:
        """Flush and mark the run ended; safe to call twice."""
        if self.disabled or self._closed:
            return
        self._closed = True
        self.flush()
        self._send({"op": "end", "status": status, "end_time": _now_ms()})

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is None:
            status = "FINISHED"
        elif issubclass(exc_type, KeyboardInterrupt):
            status = "KILLED"
        else:
            status = "FAILED"
        self.close(status)


def _param_value(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    return json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def _preprocessing_spec_of(path: Path) -> dict[str, Any] | None:
    """The preprocessing spec of a vesselseg model file; None for any other file."""
    try:
        from vesselseg.models import load_model

        _, meta = load_model(path, map_location="cpu")
    except Exception:
        return None
    spec = (meta.get("extra") or {}).get("preprocessing")
    return spec if isinstance(spec, dict) else None


def _save_pytorch_model(path: Path, example: np.ndarray, model: torch.nn.Module | None, dest: Path) -> Path:
    import numpy as np
    import torch
    from mlflow.models import infer_signature
    from mlflow.pytorch import save_model

    if model is None:
        from vesselseg.models import load_model  # the lead's module; absent -> warning above

        model, _meta = load_model(path, map_location="cpu")
    x = np.asarray(example, dtype=np.float32)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise DataError(f"input_example must be (C,H,W) or (N,C,H,W), got shape {x.shape}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            y = model(torch.from_numpy(x)).numpy()
    finally:
        model.train(was_training)
    # "pickle", not MLflow's default "pt2": torch.export fixes H and W to the
    # example's, and a fully convolutional segmenter must take any image size.
    # MLflow warns about pickle on every save; the model is our own, so hush it.
    mlflow_log = logging.getLogger("mlflow.pytorch")
    level = mlflow_log.level
    mlflow_log.setLevel(logging.ERROR)
    try:
        save_model(
            model,
            str(dest),
            signature=infer_signature(x, y),
            input_example=x,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            serialization_format="pickle",
        )
    finally:
        mlflow_log.setLevel(level)
    return dest


# ------------------------------------------------------------------------ sync


def pending_offline(root: Path | None = None) -> list[Path]:
    """Journal folders still waiting to be synced, oldest first."""
    base = offline_root(root)
    if not base.is_dir():
        return []
    return sorted((p for p in base.iterdir() if (p / "run.json").is_file()), key=lambda p: p.stat().st_mtime)


def sync_offline(uri: str | None = None, root: Path | None = None) -> int:
    """Replay every offline journal to ``uri`` (default: the project's tracking URI).

    Each operation file is deleted right after MLflow accepted it, and a journal
    folder once empty; a run created during an earlier, interrupted sync is reused
    (its id is written back to ``run.json``).  Returns the number of runs fully
    replayed.  Raises :class:`TrackingError` when the server does not answer, leaving
    the journals untouched.
    """
    journals = pending_offline(root)
    if not journals:
        return 0
    uri = uri or default_tracking_uri(repo_root(root))
    _configure_http(10, 0)
    if not server_reachable(uri):
        raise TrackingError(f"{uri}: tracking server does not answer; {len(journals)} offline run(s) kept")
    client = _client(uri)
    done = 0
    for folder in journals:
        journal = _Journal(folder)
        try:
            run_id = _resume_run(client, journal, artifact_location(uri, journal.meta["experiment"], root))
            for op_file in journal.pending():
                _apply(client, run_id, json.loads(op_file.read_text()), base=folder)
                op_file.unlink()
        except TrackingError:
            raise
        except Exception as err:
            raise TrackingError(f"{folder}: replay to {uri} stopped ({_first_line(err)}); rerun to resume") from err
        shutil.rmtree(folder)
        log.info("synced offline run %s -> MLflow run %s", folder.name, run_id)
        done += 1
    return done


def _resume_run(client: Any, journal: _Journal, location: str) -> str:
    """The journal's run on this server, or a new one; ``location``: the artifact location
    for the replay target (the journal may have been recorded for another kind of URI)."""
    meta = {**journal.meta, "artifact_location": location}
    run_id = meta.get("run_id")
    if run_id:
        with contextlib.suppress(Exception):
            client.get_run(run_id)
            return run_id
        log.warning("run %s of %s not on this server; creating a new run", run_id, journal.folder)
    run_id = _create_run(client, meta)
    journal.set_run_id(run_id)
    return run_id
