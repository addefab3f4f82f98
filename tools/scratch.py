"""Throwaway copies of this project as fresh DVC repositories (test and benchmark support).

The end-to-end tests, the pipeline benchmark and the quality runs all need what a
new user has: a clean git + DVC repository holding this project's pipeline, with
some params changed.  They get it from here, so they cannot drift apart.  It lives
outside the package (``tools/``, imported by tests/ and benchmarks/ from the
repository root) because users of vesselseg never need it.

Two kinds of copy: :func:`make_project` copies the working tree's pipeline files and
changes the *base* of the Hydra composition (``conf/config.yaml``), so both
``dvc repro`` and ``dvc exp run -S ...`` see the changed settings; :func:`clone_project`
is a ``git clone`` of a commit, as a new user gets it (committed ``dvc.lock`` and
metrics included).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

PROJECT_FILES = ("dvc.yaml", "stages", "src", "pyproject.toml", ".gitignore", ".dvcignore", "conf")


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Nested dict update (a partial params file over the full one)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(base.get(k) or {}, v) if isinstance(v, dict) else v
    return out


def scratch_env(threads: int | None = None) -> dict[str, str]:
    """The environment a stage sees: this interpreter's ``python`` first on PATH."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "GIT_AUTHOR_NAME": "vesselseg",
        "GIT_AUTHOR_EMAIL": "vesselseg@localhost",
        "GIT_COMMITTER_NAME": "vesselseg",
        "GIT_COMMITTER_EMAIL": "vesselseg@localhost",
    }
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
    """Copy the pipeline into ``dest`` with ``overrides`` merged into ``conf/config.yaml``; git + dvc init, commit.

    The overrides change the base of the composition (not only ``params.yaml``):
    with Hydra enabled, every ``dvc exp run`` recomposes ``params.yaml`` from
    ``conf/``, so an override written to ``params.yaml`` alone would be lost there.
    """
    from vesselseg.recipes import write_params

    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in PROJECT_FILES:
        src = root / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        elif src.is_file():
            shutil.copy2(src, dest / name)
    config = dest / "conf" / "config.yaml"
    tree = yaml.safe_load(config.read_text())
    defaults = tree.pop("defaults")
    config.write_text(yaml.safe_dump({"defaults": defaults, **merge(tree, overrides)}, sort_keys=False))
    write_params(dest / "params.yaml", root=dest)
    run(["git", "init", "-q", "-b", "main"], dest, env)
    run(["dvc", "init", "-q"], dest, env)
    run(["dvc", "config", "core.analytics", "false"], dest, env)
    run(["dvc", "config", "hydra.enabled", "true"], dest, env)
    run(["git", "add", "-A"], dest, env)
    run(["git", "commit", "-qm", "scratch project"], dest, env)
    return dest


def clone_project(dest: Path, *, root: Path, env: dict[str, str], rev: str = "HEAD") -> Path:
    """``git clone`` of ``root`` checked out at ``rev``: exactly what a new user gets (no DVC cache)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    run(["git", "clone", "-q", "--no-hardlinks", str(root), str(dest)], dest.parent, env)
    commit = run(["git", "rev-parse", rev], root, env, stdout_only=True).strip()
    run(["git", "checkout", "-q", commit], dest, env)
    return dest
