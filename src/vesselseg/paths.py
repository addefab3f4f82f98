"""Where the original repository lives, and where MLflow writes inside it.

``dvc exp run --temp`` and ``dvc queue`` run every stage in a throw-away copy under
``<root>/.dvc/tmp/exps/...`` that is deleted afterwards (see /work/shared/FACTS.md).
Anything resolved relative to the working directory there (MLflow's default
``sqlite:///mlflow.db``, ``./mlruns``) would vanish with it, so tracking paths are
always anchored at the *original* root found here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["artifact_root", "default_tracking_uri", "offline_root", "repo_root"]

_EXPS_PARTS = (".dvc", "tmp", "exps")
_MARKERS = ("dvc.yaml", ".git")


def _before_exps(path: Path) -> Path | None:
    """The folder holding ``.dvc/tmp/exps`` when ``path`` lies inside such a copy."""
    parts = path.parts
    n = len(_EXPS_PARTS)
    for i in range(len(parts) - n + 1):
        if parts[i : i + n] == _EXPS_PARTS:
            return Path(*parts[:i]) if i else Path(path.anchor)
    return None


def repo_root(start: Path | None = None) -> Path:
    """The original repository root, even from inside a DVC experiment's temp copy.

    Order: a ``.dvc/tmp/exps`` component in ``start`` (default: the cwd) or in
    ``DVC_ROOT`` wins; then ``DVC_ROOT`` itself; then the nearest ancestor holding
    ``dvc.yaml`` or ``.git``; else ``start``.
    """
    start = Path(start if start is not None else Path.cwd()).expanduser().resolve()
    root = _before_exps(start)
    if root is not None:
        return root
    env_root = os.environ.get("DVC_ROOT")
    if env_root:
        env_path = Path(env_root).expanduser().resolve()
        return _before_exps(env_path) or env_path
    for folder in (start, *start.parents):
        if any((folder / marker).exists() for marker in _MARKERS):
            return folder
    return start


def default_tracking_uri(root: Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else a SQLite file at the repository root."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    base = repo_root(root)
    # An absolute path after "sqlite:///" gives SQLAlchemy's four-slash absolute form.
    return "sqlite:///" + (base / "mlflow.db").as_posix()


def artifact_root(root: Path | None = None) -> Path:
    """``<root>/mlruns``: artifacts stored beside the database, outside any temp copy."""
    return repo_root(root) / "mlruns"


def offline_root(root: Path | None = None) -> Path:
    """``<root>/.mlflow-offline``: runs recorded while the tracking server was away."""
    return repo_root(root) / ".mlflow-offline"


def git(repo: Path | str, *args: str, timeout: float = 30) -> str | None:
    """stdout of ``git ARGS`` run in ``repo``, or None when git fails or is missing.

    Tracking tags and the PR report both ask git and must go on without it (a tarball
    of the project, a CI runner without history), so a failure is a value, not an error.
    """
    import subprocess

    try:
        res = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout if res.returncode == 0 else None
