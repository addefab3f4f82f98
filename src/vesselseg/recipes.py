"""Named recipes: partial params files under ``recipes/`` applied with ``dvc exp run -S``.

A recipe is a partial ``params.yaml`` (same nesting) that sets ``recipe: <name>`` and
only the keys the recipe defines; its leading comment is its description.  Running
one is one DVC experiment, so it goes through the same stages and lands in the same
metric files (and MLflow runs, tagged ``recipe``) as every other run::

    vesselseg recipes list
    vesselseg recipes show knn
    vesselseg recipes run knn [--queue] [-S train.epochs=2] [--dry-run]
    vesselseg recipes table [--out reports/recipes.md]

Why ``-S`` rather than copying the file over ``params.yaml``: ``dvc exp run -S``
records the changed params in the experiment itself (``dvc exp show`` lists them),
keeps ``params.yaml``'s comments, and works with ``--queue``, whose runs are built
from the committed tree plus the workspace changes.  Because the workspace
``params.yaml`` may still hold the params of the previous workspace experiment, a
run also resets every key that differs from the committed ``params.yaml`` and that
the recipe does not set: each recipe runs on *committed params + recipe*, never on
the leftovers of another recipe.

The table is built from MLflow, not from ``dvc exp show --json``: every stage run
(workspace, ``--temp`` or queued) logs to the one store at the repository root with
the tags ``recipe``, ``dataset``, ``stage`` and ``dvc_exp_name``, and queued
experiments that DVC has garbage-collected or never applied are still there.  A
row's wall time spans the train run's start to the evaluate run's end of the same
experiment (train + predict + evaluate; cached data stages are shared and excluded).
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
import secrets
import shlex
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import yaml

from vesselseg import atomic
from vesselseg.errors import ParamsError, VesselsegError
from vesselseg.params import flatten, parse_params, set_dotted

log = logging.getLogger(__name__)

__all__ = [
    "COMMANDS",
    "Recipe",
    "RecipeRow",
    "base_params",
    "dvc_set_args",
    "hydra_value",
    "list_recipes",
    "load_recipe",
    "merge_params",
    "recipe_rows_from_mlflow",
    "recipes",
    "render_table",
    "run_recipe",
]

RECIPES_DIRNAME = "recipes"
# metric columns of the table: (header, key in the flattened evaluate metrics)
TABLE_METRICS = (
    ("test dice", "test.dice"),
    ("test IoU", "test.iou"),
    ("test AUC", "test.auc_roc"),
    ("test sens.", "test.sensitivity"),
    ("test spec.", "test.specificity"),
    ("test acc.", "test.accuracy"),
    ("val dice", "val.dice"),
    ("val AUC", "val.auc_roc"),  # OCTA-500's 2D release has no test split: its row is validation only
)


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    path: Path


def recipes_dir(root: Path | str | None = None) -> Path:
    """``root`` itself when it holds recipe files, else ``<root or repo root>/recipes``."""
    if root is not None:
        root = Path(root)
        return root / RECIPES_DIRNAME if (root / RECIPES_DIRNAME).is_dir() else root
    from vesselseg.paths import repo_root

    return repo_root() / RECIPES_DIRNAME


def _description(text: str) -> str:
    """The leading ``#`` comment block, joined into one paragraph."""
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            break
        lines.append(stripped.lstrip("#").strip())
    return " ".join(x for x in lines if x)


def list_recipes(root: Path | str | None = None) -> list[Recipe]:
    """Every ``<name>.yaml`` under the recipes folder, sorted by name."""
    folder = recipes_dir(root)
    if not folder.is_dir():
        raise ParamsError(f"{folder}: recipes folder not found")
    out = []
    for path in sorted(folder.glob("*.yaml")):
        out.append(Recipe(path.stem, _description(path.read_text(encoding="utf-8")), path))
    return out


def load_recipe(name: str, root: Path | str | None = None) -> dict[str, Any]:
    """The recipe's params tree, checked against the schema.

    Raises ParamsError naming the valid recipes (with a did-you-mean) for an unknown
    name, and the file and dotted key for a key or value the schema refuses.
    """
    folder = recipes_dir(root)
    known = [r.name for r in list_recipes(folder)]
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ParamsError(f"unknown recipe {name!r} (valid: {', '.join(known) or 'none'}){hint}")
    path = folder / f"{name}.yaml"
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: malformed YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(tree, dict):
        raise ParamsError(f"{path}: a recipe must be a mapping of params sections")
    if tree.get("recipe") != name:
        raise ParamsError(f"{path}: must set `recipe: {name}` (got {tree.get('recipe')!r})")
    parse_params(tree, path)  # unknown keys and bad values fail here, naming the key
    return tree


def merge_params(base: Mapping[str, Any], recipe: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key, anything else (lists too) is replaced."""
    out: dict[str, Any] = {k: (merge_params(v, {}) if isinstance(v, Mapping) else v) for k, v in base.items()}
    for key, value in recipe.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_params(out[key], value)
        elif isinstance(value, Mapping):
            out[key] = merge_params({}, value)
        else:
            out[key] = value
    return out


# strings Hydra reads back unchanged without quotes (and YAML too): names, paths, labels
_BARE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-./]*")
_HYDRA_WORDS = {"true", "false", "null", "inf", "nan", "yes", "no", "on", "off", "y", "n", "none"}


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def hydra_value(value: Any) -> str:
    """One value as text that DVC's ``-S`` parser (Hydra's override grammar) reads back as ``value``.

    This is YAML flow style (``[1.5, 3.0]``, ``null``, ``true``, ``0.0001``); strings
    other than plain names are single-quoted: unquoted, Hydra reads ``OCTA(ILM_OPL)``
    as a function call, ``~`` as a syntax error, ``1e-4`` as a float and ``true`` as
    a boolean.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ParamsError(f"{value!r} cannot be passed with -S (not finite)")
        return repr(value)
    if isinstance(value, str):
        bare = _BARE.fullmatch(value) and value.lower() not in _HYDRA_WORDS
        return value if bare else _quote(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {hydra_value(v)}" for k, v in value.items()) + "}"
    raise ParamsError(f"{value!r} ({type(value).__name__}) cannot be passed with -S")


def dvc_set_args(recipe: Mapping[str, Any]) -> list[str]:
    """``["-S", "key=value", ...]`` for every leaf of ``recipe`` (dotted keys, sorted)."""
    args: list[str] = []
    for key, value in sorted(flatten(dict(recipe)).items()):
        args += ["-S", f"{key}={hydra_value(value)}"]
    return args


def parse_sets(sets: Iterable[str]) -> dict[str, Any]:
    """``["train.lr=1e-4", ...]`` -> ``{"train.lr": 0.0001}`` (values read as YAML)."""
    out: dict[str, Any] = {}
    for item in sets:
        key, sep, text = item.partition("=")
        key = key.strip().lstrip("+")
        if not sep or not key:
            raise ParamsError(f"-S {item!r}: expected key=value")
        try:
            out[key] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            raise ParamsError(f"-S {item!r}: the value is not valid YAML") from None
    return out


def _git_params(repo: Path) -> dict[str, Any] | None:
    """``params.yaml`` as committed at HEAD, or None outside git / before a commit."""
    try:
        out = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=repo, capture_output=True, text=True, check=False)
    except OSError:
        return None
    if out.returncode != 0:
        return None
    return yaml.safe_load(out.stdout) or {}


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found (run from the repository root)")
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def base_params(repo: Path) -> dict[str, Any]:
    """The params a recipe applies over: ``params.yaml`` as committed, else the workspace file."""
    committed = _git_params(Path(repo))
    if committed is None:
        log.warning("no committed params.yaml at HEAD in %s: recipes apply over the workspace params.yaml", repo)
        return _read_yaml(Path(repo) / "params.yaml")
    return committed


def experiment_args(
    name: str,
    *,
    repo: Path,
    extra_sets: Sequence[str] = (),
    recipes_root: Path | None = None,
) -> list[str]:
    """The ``-S`` arguments that make ``params.yaml`` = committed params + recipe + extras.

    Keys absent from the workspace ``params.yaml`` use Hydra's ``++`` (add or
    override); keys the workspace changed but the recipe does not set are reset to
    their committed value.  The target params are validated before DVC is called.
    """
    recipe = load_recipe(name, recipes_root)
    extras = parse_sets(extra_sets)
    workspace = _read_yaml(repo / "params.yaml")
    committed = base_params(repo)
    target = merge_params(committed, recipe)
    for key, value in extras.items():
        set_dotted(target, key, value)
    parse_params(target, f"recipe {name} over params.yaml")
    wanted = flatten(recipe)
    wanted.update(extras)
    base_flat, work_flat, target_flat = flatten(committed), flatten(workspace), flatten(target)
    for key, value in work_flat.items():
        if key in wanted:
            continue
        if key in base_flat:
            if base_flat[key] != value:
                wanted[key] = base_flat[key]
        elif key not in target_flat:
            log.warning("params.yaml: %s is not in the committed params; left as it is", key)
    args: list[str] = []
    for key in sorted(wanted):
        prefix = "" if key in work_flat else "++"
        args += ["-S", f"{prefix}{key}={hydra_value(wanted[key])}"]
    return args


def _dvc_env() -> dict[str, str]:
    """The venv's bin first on PATH: DVC runs stage commands (`python ...`) through /bin/sh."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def run_recipe(
    name: str,
    *,
    queue: bool = False,
    extra_sets: Sequence[str] = (),
    dry_run: bool = False,
    repo: Path | None = None,
    recipes_root: Path | None = None,
) -> list[str]:
    """``dvc exp run -n <name>-<6 hex> [--queue] -S ...``: print it, then run it unless ``dry_run``.

    The experiment name carries the recipe so ``dvc exp show`` and MLflow's
    ``dvc_exp_name`` tag say which recipe made each run.  Returns the command.
    """
    from vesselseg.paths import repo_root

    repo = Path(repo) if repo is not None else repo_root()
    sets = experiment_args(name, repo=repo, extra_sets=extra_sets, recipes_root=recipes_root)
    argv = ["dvc", "exp", "run", "-n", f"{name}-{secrets.token_hex(3)}", *(["--queue"] if queue else []), *sets]
    click.echo(shlex.join(argv))
    if dry_run:
        return argv
    code = subprocess.run([sys.executable, "-m", "dvc", *argv[1:]], cwd=repo, env=_dvc_env(), check=False).returncode
    if code != 0:
        raise VesselsegError(f"recipe {name}: `dvc exp run` exited with status {code} (see its output above)")
    return argv


# -- the table ------------------------------------------------------------------------


@dataclass
class RecipeRow:
    """One line of the recipe table: metrics are flattened evaluate keys (``test.dice``)."""

    recipe: str
    dataset: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    wall_seconds: float | None = None
    train_seconds: float | None = None
    note: str = ""


def _fmt_seconds(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return ""
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _fmt_metric(value: Any) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return ""
    return f"{value:.4f}" if math.isfinite(value) else ""


def render_table(rows: Sequence[RecipeRow]) -> str:
    """A GitHub markdown table: recipe, dataset, test/val metrics, train time, wall time, note."""
    from vesselseg.runs import markdown_table

    header = ["recipe", "dataset", *(h for h, _ in TABLE_METRICS), "train time", "wall time", "note"]
    body = []
    for r in rows:
        body.append([
            r.recipe, r.dataset, *(_fmt_metric(r.metrics.get(k)) for _, k in TABLE_METRICS),
            _fmt_seconds(r.train_seconds), _fmt_seconds(r.wall_seconds), r.note,
        ])
    return markdown_table(header, body)


def one_line(text: str, limit: int = 160) -> str:
    """The last non-empty line of an error output, whitespace-collapsed and trimmed: a table cell."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    line = lines[-1] if lines else "unknown error"
    line = re.sub(r"\s+", " ", line)
    return line if len(line) <= limit else line[: limit - 3] + "..."


def recipe_rows_from_mlflow(
    names: Sequence[str],
    *,
    experiment: str | None = None,
    uri: str | None = None,
) -> list[RecipeRow]:
    """One row per recipe from its newest finished evaluate run in MLflow.

    The train run is the one of the same DVC experiment (``dvc_exp_name`` tag) or,
    without that tag, the newest train run of the recipe that started before the
    evaluate run.  A recipe without an evaluate run keeps its row, marked "not run".
    """
    from vesselseg.runs import search

    rows = []
    for name in names:
        runs = search(experiment, recipe=name, uri=uri)  # newest first
        evals = [r for r in runs if r.data.tags.get("stage") == "evaluate" and r.info.status == "FINISHED"]
        if not evals:
            rows.append(RecipeRow(name, note="not run (no evaluate run tagged with this recipe in MLflow)"))
            continue
        ev = evals[0]
        exp_name = ev.data.tags.get("dvc_exp_name")
        trains = [
            r for r in runs
            if r.data.tags.get("stage") == "train" and r.info.start_time <= ev.info.start_time
            and (exp_name is None or r.data.tags.get("dvc_exp_name") == exp_name)
        ]
        tr = trains[0] if trains else None
        wall = None
        if tr is not None and ev.info.end_time:
            wall = (ev.info.end_time - tr.info.start_time) / 1000.0
        train_s = tr.data.metrics.get("final.train_seconds") if tr is not None else None
        rows.append(RecipeRow(
            name, dataset=ev.data.tags.get("dataset", ""), metrics=dict(ev.data.metrics), wall_seconds=wall,
            train_seconds=train_s, note=exp_name or "",
        ))
    return rows


def write_table(rows: Sequence[RecipeRow], out: Path | None, title: str) -> str:
    text = f"# {title}\n\n{render_table(rows)}\n"
    if out is not None:
        atomic.write_text(out, text)
    return text


# -- commands -------------------------------------------------------------------------


@click.group("recipes")
def recipes() -> None:
    """Named experiments (recipes/*.yaml) run with `dvc exp run`, and their table."""


@recipes.command("list")
def list_cmd() -> None:
    """Every recipe with its one-line description."""
    for r in list_recipes():
        summary = r.description.split(". ")[0].rstrip(".")
        click.echo(f"{r.name:16s} {summary}")


@recipes.command("show")
@click.argument("name")
def show_cmd(name: str) -> None:
    """The recipe's description, params and the -S arguments it becomes."""
    tree = load_recipe(name)
    path = recipes_dir() / f"{name}.yaml"
    click.echo(path.read_text(encoding="utf-8").rstrip())
    click.echo("\n# as dvc exp run arguments:")
    click.echo(shlex.join(dvc_set_args(tree)))


@recipes.command("run")
@click.argument("name")
@click.option("--queue", is_flag=True, help="Queue the experiment (start with `dvc queue start -j N`).")
@click.option("-S", "--set-param", "sets", multiple=True, metavar="KEY=VALUE",
              help="Extra params over the recipe (YAML values), e.g. -S train.epochs=2.")
@click.option("--dry-run", is_flag=True, help="Print the dvc command without running it.")
def run_cmd(name: str, queue: bool, sets: tuple[str, ...], dry_run: bool) -> None:
    """Run recipe NAME as one DVC experiment named NAME-<id>."""
    run_recipe(name, queue=queue, extra_sets=list(sets), dry_run=dry_run)


@recipes.command("table")
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/recipes.md"), show_default=True)
@click.option("--experiment", default=None, help="MLflow experiment (default: all).")
def table_cmd(out: Path, experiment: str | None) -> None:
    """Every recipe's newest metrics from MLflow as a markdown table (written to OUT and printed)."""
    rows = recipe_rows_from_mlflow([r.name for r in list_recipes()], experiment=experiment)
    click.echo(write_table(rows, out, "Recipes (from MLflow runs tagged `recipe`)"), nl=False)


COMMANDS = [recipes]
