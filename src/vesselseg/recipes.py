"""Datasets and recipes as DVC experiments, composed by DVC's Hydra integration.

``conf/config.yaml`` holds every setting with its comment; ``conf/dataset/<name>.yaml``
and ``conf/recipe/<name>.yaml`` are partial files of the same nesting (``# @package
_global_``) chosen by its defaults list.  With ``hydra.enabled`` in ``.dvc/config``,
each ``dvc exp run`` composes *config + dataset + recipe + -S overrides* and writes the
result over ``params.yaml``; ``dvc repro`` runs on ``params.yaml`` as it is, which is
committed equal to the composition of the defaults (``tests/test_conf.py``)::

    dvc exp run -S dataset=drive -S recipe=octa-unet4 -S train.lr=3e-4
    vesselseg recipes list | show knn | run knn [--dataset drive] [--queue] [-S k=v]
    vesselseg recipes compose [-S dataset=drive]     # rewrite params.yaml for `dvc repro`
    vesselseg recipes table

Why Hydra rather than our own overlay: a DVC user already types ``-S``; Hydra makes
``-S dataset=drive`` a choice of a whole file and recomposes from ``conf/`` on every
run, so an experiment never inherits the leftovers of the previous one (the old
overlay reset such keys by hand).  What this module adds is checking before any
work: :func:`compose` refuses an unknown dataset or recipe with one line naming the
valid ones (Hydra's own message spans a dozen lines) and validates the result against
the schema; ``vesselseg recipes run`` calls it before DVC.

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import yaml

from vesselseg import atomic
from vesselseg.errors import ParamsError, VesselsegError
from vesselseg.params import parse_params

log = logging.getLogger(__name__)

__all__ = [
    "COMMANDS",
    "GROUPS",
    "Choice",
    "RecipeRow",
    "check_source",
    "compose",
    "conf_dir",
    "experiment_argv",
    "list_choices",
    "list_recipes",
    "load_recipe",
    "params_text",
    "recipe_rows_from_mlflow",
    "recipes",
    "render_table",
    "run_recipe",
    "write_params",
]

CONF_DIRNAME = "conf"
CONFIG_NAME = "config"
GROUPS = ("dataset", "recipe")
PARAMS_HEADER = (
    "# GENERATED from conf/ (config.yaml + dataset + recipe) by DVC's Hydra composition:\n"
    "# every `dvc exp run` rewrites this file, and `vesselseg recipes compose` does for\n"
    "# `dvc repro`.  Edit the commented settings in conf/, not here.\n"
)
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
class Choice:
    """One file of a config group: ``conf/<group>/<name>.yaml`` and its leading comment."""

    group: str
    name: str
    description: str
    path: Path


def conf_dir(root: Path | str | None = None) -> Path:
    """``<root>/conf`` (``root`` itself when it is a conf folder); default: the repository's."""
    if root is None:
        from vesselseg.paths import repo_root

        root = repo_root()
    root = Path(root)
    return root if (root / f"{CONFIG_NAME}.yaml").is_file() else root / CONF_DIRNAME


def _description(text: str) -> str:
    """The leading ``#`` comment block without Hydra's ``@package`` line, as one paragraph."""
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            break
        body = stripped.lstrip("#").strip()
        if not body.startswith("@package"):
            lines.append(body)
    return " ".join(x for x in lines if x)


def list_choices(group: str, root: Path | str | None = None) -> list[Choice]:
    """Every ``conf/<group>/*.yaml``, sorted by name."""
    folder = conf_dir(root) / group
    if not folder.is_dir():
        raise ParamsError(f"{folder}: config group folder not found")
    return [
        Choice(group, p.stem, _description(p.read_text(encoding="utf-8")), p) for p in sorted(folder.glob("*.yaml"))
    ]


def list_recipes(root: Path | str | None = None) -> list[Choice]:
    return list_choices("recipe", root)


def _unknown(group: str, name: str, known: Sequence[str], folder: Path) -> ParamsError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ParamsError(f"{folder}: unknown {group} {name!r} (valid: {', '.join(known) or 'none'}){hint}")


def _check_choices(overrides: Sequence[str], root: Path) -> None:
    """Unknown ``dataset=``/``recipe=`` names (sweeps too) fail here, in one line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as err:
        raise ParamsError(f"-S: {' '.join(str(err).split())}") from None
    for ov in parsed:
        group = ov.key_or_group
        if group not in GROUPS:
            continue
        known = [c.name for c in list_choices(group, root)]
        values = list(ov.sweep_string_iterator()) if ov.is_sweep_override() else [ov.value()]
        for value in values:
            if str(value) not in known:
                raise _unknown(group, str(value), known, root / group)


def compose(overrides: Sequence[str] = (), *, root: Path | str | None = None, validate: bool = True) -> dict[str, Any]:
    """The params tree DVC writes for ``dvc exp run -S <overrides...>`` (same Hydra calls).

    ``overrides`` are Hydra override strings (``dataset=drive``, ``train.lr=3e-4``,
    ``++key=value``).  Raises ParamsError, in one line, for an unknown dataset or
    recipe, an override Hydra refuses, or (``validate``) a result the schema refuses.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    folder = conf_dir(root).resolve()
    if not (folder / f"{CONFIG_NAME}.yaml").is_file():
        raise ParamsError(f"{folder / (CONFIG_NAME + '.yaml')}: not found (run from the repository root)")
    _check_choices(overrides, folder)
    try:
        with initialize_config_dir(str(folder), version_base=None):
            cfg = hydra_compose(config_name=CONFIG_NAME, overrides=list(overrides))
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as err:
        raise ParamsError(f"{folder}: {' '.join(str(err).split())}") from None
    container = OmegaConf.to_container(cfg)
    if not isinstance(container, dict):
        raise ParamsError(f"{folder / (CONFIG_NAME + '.yaml')}: the composition is not a mapping")
    tree = {str(k): v for k, v in container.items()}
    if validate:
        parse_params(tree, f"{folder} + {' '.join(overrides) or 'defaults'}")
    return tree


def params_text(overrides: Sequence[str] = (), *, root: Path | str | None = None) -> str:
    """``params.yaml`` as committed: the header, then exactly what DVC's composition writes."""
    from omegaconf import OmegaConf

    return PARAMS_HEADER + OmegaConf.to_yaml(OmegaConf.create(compose(overrides, root=root)))


def write_params(path: Path | str, overrides: Sequence[str] = (), *, root: Path | str | None = None) -> Path:
    """Compose and write ``params.yaml`` atomically (``vesselseg recipes compose``)."""
    path = Path(path)
    atomic.write_text(path, params_text(overrides, root=root))
    return path


def check_source(tree: dict[str, Any], base: Path | str) -> None:
    """A ``data.source`` that names missing paths (relative to ``base``) fails in one line.

    The download stage refuses it too, but only once DVC runs; commands that start a
    run (``recipes run``, benchmarks) call this first, so nothing is queued in vain.
    """
    source = (tree.get("data") or {}).get("source")
    if source in (None, ""):
        return
    missing = [
        p for p in str(source).split(os.pathsep) if p.strip() and not (Path(base) / Path(p).expanduser()).exists()
    ]
    if missing:
        raise ParamsError(f"data.source: {', '.join(missing)} does not exist (relative paths are read from {base})")


def load_recipe(name: str, root: Path | str | None = None) -> dict[str, Any]:
    """Recipe ``name`` as a params tree of its own keys; unknown names fail with the valid ones."""
    folder = conf_dir(root)
    known = [c.name for c in list_recipes(folder)]
    if name not in known:
        raise _unknown("recipe", name, known, folder / "recipe")
    path = folder / "recipe" / f"{name}.yaml"
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: malformed YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(tree, dict):
        raise ParamsError(f"{path}: a recipe must be a mapping of params sections")
    if tree.get("recipe") != name:
        raise ParamsError(f"{path}: must set `recipe: {name}` (got {tree.get('recipe')!r})")
    return tree


def _dvc_env() -> dict[str, str]:
    """The venv's bin first on PATH: DVC runs stage commands (`python ...`) through /bin/sh."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def experiment_argv(
    recipe: str,
    *,
    dataset: str | None = None,
    extra_sets: Sequence[str] = (),
    queue: bool = False,
    repo: Path | None = None,
) -> list[str]:
    """``dvc exp run -n <recipe>-<6 hex> [--queue] -S recipe=.. [-S dataset=..] [-S extra..]``, checked first.

    The composition is validated (names, schema, ``data.source``) before anything runs;
    the experiment name carries the recipe so ``dvc exp show`` and MLflow's
    ``dvc_exp_name`` tag say which recipe made each run.
    """
    from vesselseg.paths import repo_root

    repo = Path(repo) if repo is not None else repo_root()
    overrides = [f"recipe={recipe}", *([f"dataset={dataset}"] if dataset else []), *extra_sets]
    tree = compose(overrides, root=repo)
    check_source(tree, repo)
    sets = [x for o in overrides for x in ("-S", o)]
    return ["dvc", "exp", "run", "-n", f"{recipe}-{secrets.token_hex(3)}", *(["--queue"] if queue else []), *sets]


def run_recipe(
    recipe: str,
    *,
    dataset: str | None = None,
    queue: bool = False,
    extra_sets: Sequence[str] = (),
    dry_run: bool = False,
    repo: Path | None = None,
) -> list[str]:
    """Print :func:`experiment_argv`'s command, then run it unless ``dry_run``; returns it."""
    from vesselseg.paths import repo_root

    repo = Path(repo) if repo is not None else repo_root()
    argv = experiment_argv(recipe, dataset=dataset, extra_sets=extra_sets, queue=queue, repo=repo)
    click.echo(shlex.join(argv))
    if dry_run:
        return argv
    code = subprocess.run([sys.executable, "-m", "dvc", *argv[1:]], cwd=repo, env=_dvc_env(), check=False).returncode
    if code != 0:
        raise VesselsegError(f"recipe {recipe}: `dvc exp run` exited with status {code} (see its output above)")
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
    seconds = round(seconds)  # round() of a float is an int
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
        body.append(
            [
                r.recipe,
                r.dataset,
                *(_fmt_metric(r.metrics.get(k)) for _, k in TABLE_METRICS),
                _fmt_seconds(r.train_seconds),
                _fmt_seconds(r.wall_seconds),
                r.note,
            ]
        )
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
            r
            for r in runs
            if r.data.tags.get("stage") == "train"
            and r.info.start_time <= ev.info.start_time
            and (exp_name is None or r.data.tags.get("dvc_exp_name") == exp_name)
        ]
        tr = trains[0] if trains else None
        wall = None
        if tr is not None and ev.info.end_time:
            wall = (ev.info.end_time - tr.info.start_time) / 1000.0
        train_s = tr.data.metrics.get("final.train_seconds") if tr is not None else None
        rows.append(
            RecipeRow(
                name,
                dataset=ev.data.tags.get("dataset", ""),
                metrics=dict(ev.data.metrics),
                wall_seconds=wall,
                train_seconds=train_s,
                note=exp_name or "",
            )
        )
    return rows


def write_table(rows: Sequence[RecipeRow], out: Path | None, title: str) -> str:
    text = f"# {title}\n\n{render_table(rows)}\n"
    if out is not None:
        atomic.write_text(out, text)
    return text


# -- commands -------------------------------------------------------------------------


@click.group("recipes")
def recipes() -> None:
    """Datasets and recipes (conf/dataset, conf/recipe) run as `dvc exp run` experiments, and their table."""


@recipes.command("list")
def list_cmd() -> None:
    """Every dataset and recipe with its one-line description."""
    for group in GROUPS:
        click.echo(f"{group}s (-S {group}=NAME):")
        for c in list_choices(group):
            summary = c.description.split(". ")[0].rstrip(".")
            click.echo(f"  {c.name:16s} {summary}")


@recipes.command("show")
@click.argument("name")
@click.option("--group", type=click.Choice(GROUPS), default="recipe", show_default=True)
def show_cmd(name: str, group: str) -> None:
    """The file of a recipe (or --group dataset) and the command that runs it."""
    known = [c.name for c in list_choices(group)]
    if name not in known:
        raise _unknown(group, name, known, conf_dir() / group)
    compose([f"{group}={name}"])  # schema errors surface here, not in the run
    click.echo((conf_dir() / group / f"{name}.yaml").read_text(encoding="utf-8").rstrip())
    click.echo("\n# run it:")
    click.echo(shlex.join(["dvc", "exp", "run", "-S", f"{group}={name}"]))


@recipes.command("run")
@click.argument("name")
@click.option("--dataset", default=None, help="Dataset config (conf/dataset/NAME.yaml); default: the config's.")
@click.option("--queue", is_flag=True, help="Queue the experiment (start with `dvc queue start -j N`).")
@click.option(
    "-S",
    "--set-param",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Extra Hydra overrides, e.g. -S train.epochs=2.",
)
@click.option("--dry-run", is_flag=True, help="Print the dvc command without running it.")
def run_cmd(name: str, dataset: str | None, queue: bool, sets: tuple[str, ...], dry_run: bool) -> None:
    """Run recipe NAME as one DVC experiment named NAME-<id>."""
    run_recipe(name, dataset=dataset, queue=queue, extra_sets=list(sets), dry_run=dry_run)


@recipes.command("compose")
@click.option(
    "-S",
    "--set-param",
    "sets",
    multiple=True,
    metavar="OVERRIDE",
    help="Hydra overrides, e.g. -S dataset=drive -S train.lr=3e-4.",
)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Default: <repo>/params.yaml.")
def compose_cmd(sets: tuple[str, ...], out: Path | None) -> None:
    """Write params.yaml from conf/ (after editing conf/, before `dvc repro`)."""
    from vesselseg.paths import repo_root

    path = write_params(out or repo_root() / "params.yaml", list(sets))
    log.info("wrote %s", path)


@recipes.command("table")
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/recipes.md"), show_default=True)
@click.option("--experiment", default=None, help="MLflow experiment (default: all).")
def table_cmd(out: Path, experiment: str | None) -> None:
    """Every recipe's newest metrics from MLflow as a markdown table (written to OUT and printed)."""
    rows = recipe_rows_from_mlflow([r.name for r in list_recipes()], experiment=experiment)
    click.echo(write_table(rows, out, "Recipes (from MLflow runs tagged `recipe`)"), nl=False)


COMMANDS = [recipes]
