"""Throwaway copies of this project as fresh DVC repositories.

The end-to-end test, the pipeline benchmark and the quality runs all need what a
new user has: a clean git + DVC repository holding this project's pipeline, with
some params changed.  They get it from here, so the three cannot drift apart.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

PROJECT_FILES = ("dvc.yaml", "stages", "src", "pyproject.toml", ".gitignore", "recipes")


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Nested dict update (a partial params file over the full one)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(base.get(k) or {}, v) if isinstance(v, dict) else v
    return out


def scratch_env(threads: int | None = None) -> dict[str, str]:
    """The environment a stage sees: this interpreter's ``python`` first on PATH."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "DVC_NO_ANALYTICS": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "GIT_AUTHOR_NAME": "vesselseg",
           "GIT_AUTHOR_EMAIL": "vesselseg@localhost", "GIT_COMMITTER_NAME": "vesselseg",
           "GIT_COMMITTER_EMAIL": "vesselseg@localhost"}
    for var in ("MLFLOW_TRACKING_URI", "VESSELSEG_TRACKING", "DVC_ROOT", "DVC_EXP_NAME", "DVC_STAGE"):
        env.pop(var, None)
    if threads:
        env["VESSELSEG_THREADS"] = str(threads)
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str], *, stdout_only: bool = False) -> str:
    """Run a command; on failure raise with the end of its output.

    Returns stdout and stderr together (DVC prints progress on both), or stdout
    alone for machine-readable output (``--json``).
    """
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res.stdout if stdout_only else res.stdout + res.stderr


def make_project(dest: Path, overrides: dict[str, Any], *, root: Path, env: dict[str, str]) -> Path:
    """Copy the pipeline into ``dest``, apply ``overrides`` to params.yaml, git + dvc init, commit."""
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in PROJECT_FILES:
        src = root / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        elif src.is_file():
            shutil.copy2(src, dest / name)
    params = merge(yaml.safe_load((root / "params.yaml").read_text()), overrides)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q", "-b", "main"], dest, env)
    run(["dvc", "init", "-q"], dest, env)
    run(["dvc", "config", "core.analytics", "false"], dest, env)
    run(["git", "add", "-A"], dest, env)
    run(["git", "commit", "-qm", "scratch project"], dest, env)
    return dest
