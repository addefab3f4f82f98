"""Tables of MLflow runs: filter by dataset, recipe or commit, compare commits.

Built on ``MlflowClient.search_runs`` (paged) rather than ``mlflow.search_runs`` so
the tracking URI is an argument, not process-global state.  Runs are found by the
tags :class:`vesselseg.tracking.RunLogger` puts on every run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from vesselseg.paths import default_tracking_uri
from vesselseg.tracking import TrackingError

log = logging.getLogger(__name__)

__all__ = ["Promotion", "markdown_table", "promote", "runs_table", "search", "side_by_side", "to_markdown"]

TAG_COLUMNS = ("stage", "git_commit", "dvc_exp_name", "dataset", "recipe")
# Params always shown; any other param is shown only when it differs between rows.
KEY_PARAMS = ("train.lr", "train.epochs", "train.loss", "model.depth", "model.base_channels")


def _quote(value: str) -> str:
    return "'" + value.replace("'", "\\'") + "'"


def _filter(dataset: str | None, recipe: str | None, commit: str | None) -> str:
    clauses = []
    if dataset:
        clauses.append(f"tags.dataset = {_quote(dataset)}")
    if recipe:
        clauses.append(f"tags.recipe = {_quote(recipe)}")
    if commit:
        # Tags hold the full sha; a short one is matched as a prefix.
        clauses.append(f"tags.git_commit LIKE {_quote(commit.lower() + '%')}")
    return " and ".join(clauses)


def sqlite_missing(uri: str) -> bool:
    """True for a ``sqlite:///`` URI whose file does not exist (opening it would create it)."""
    if not uri.startswith("sqlite:///"):
        return False
    return not Path(uri[len("sqlite:///") :]).exists()


def search(
    experiment: str | None = None,
    *,
    dataset: str | None = None,
    recipe: str | None = None,
    commit: str | None = None,
    uri: str | None = None,
) -> list[Any]:
    """All matching ``mlflow.entities.Run`` objects, newest first."""
    uri = uri or default_tracking_uri()
    if sqlite_missing(uri):
        return []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if experiment:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return []
        exp_ids = [exp.experiment_id]
    else:
        exp_ids = [e.experiment_id for e in client.search_experiments()]
    if not exp_ids:
        return []
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs(
            exp_ids,
            filter_string=_filter(dataset, recipe, commit),
            max_results=1000,
            order_by=["attributes.start_time DESC"],
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _row(run: Any) -> dict[str, Any]:
    tags = run.data.tags
    row: dict[str, Any] = {
        "run_id": run.info.run_id,
        "start_time": pd.Timestamp(run.info.start_time, unit="ms", tz="UTC"),
        "status": run.info.status,
    }
    for tag in TAG_COLUMNS:
        row[tag] = tags.get(tag)
    if row["git_commit"]:
        row["git_commit"] = row["git_commit"][:8]
    row.update({f"params.{k}": v for k, v in run.data.params.items()})
    row.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
    return row


def _metric_column(df: pd.DataFrame, metric: str) -> str:
    col = metric if metric.startswith("metrics.") else f"metrics.{metric}"
    if col not in df.columns:
        known = ", ".join(c[len("metrics.") :] for c in df.columns if c.startswith("metrics.")) or "none"
        from vesselseg.errors import ParamsError

        raise ParamsError(f"sort metric {metric!r} not logged by these runs (known: {known})")
    return col


def runs_table(
    experiment: str | None = None,
    *,
    dataset: str | None = None,
    recipe: str | None = None,
    commit: str | None = None,
    sort_by: str | None = None,
    ascending: bool = False,
    params: Sequence[str] | None = None,
    uri: str | None = None,
) -> pd.DataFrame:
    """One row per run: id, start, tags, selected ``params.*`` and all ``metrics.*``.

    ``params`` picks the param columns; by default :data:`KEY_PARAMS` plus every
    param whose value differs between the rows, since a table of 60 constant
    columns hides the one that changed.  ``sort_by`` names a metric (``test.dice``),
    best (highest) first unless ``ascending``.
    """
    runs = search(experiment, dataset=dataset, recipe=recipe, commit=commit, uri=uri)
    df = pd.DataFrame([_row(r) for r in runs])
    if df.empty:
        return pd.DataFrame(columns=["run_id", "start_time", "status", *TAG_COLUMNS])
    param_cols = [c for c in df.columns if c.startswith("params.")]
    if params is not None:
        keep = [f"params.{p}" if not p.startswith("params.") else p for p in params]
        keep = [c for c in keep if c in df.columns]
    else:
        keep = [
            c for c in param_cols if c[len("params.") :] in KEY_PARAMS or df[c].astype(str).nunique(dropna=False) > 1
        ]
    metric_cols = sorted(c for c in df.columns if c.startswith("metrics."))
    df = df[["run_id", "start_time", "status", *TAG_COLUMNS, *keep, *metric_cols]]
    if sort_by:
        df = df.sort_values(_metric_column(df, sort_by), ascending=ascending, na_position="last", kind="stable")
    return df.reset_index(drop=True)


def side_by_side(
    commits: Sequence[str],
    *,
    experiment: str | None = None,
    uri: str | None = None,
    labels: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Metrics (rows) of two or more commits (columns), from their newest runs.

    For each commit the newest run of each stage is taken and their metrics merged
    (train and evaluate log different names).  Columns are ``labels`` or the short
    shas; a commit without runs gives an empty (NaN) column.
    """
    names = list(labels) if labels is not None else [c[:8] for c in commits]
    if len(names) != len(commits):
        raise ValueError(f"labels has {len(names)} entries for {len(commits)} commits")
    columns: dict[str, dict[str, float]] = {}
    for name, commit in zip(names, commits, strict=True):
        merged: dict[str, float] = {}
        seen: set[str | None] = set()
        for run in search(experiment, commit=commit, uri=uri):  # newest first
            stage = run.data.tags.get("stage")
            if stage in seen:
                continue
            seen.add(stage)
            for key, value in run.data.metrics.items():
                merged.setdefault(key, value)
        columns[name] = merged
    df = pd.DataFrame(columns, columns=names)
    return df.sort_index()


def to_markdown(df: pd.DataFrame, *, index: bool = False, floatfmt: str = ".4f") -> str:
    """A GitHub markdown table.

    Our own although pandas' ``to_markdown`` could render it (its tabulate comes with
    DVC): NaN/NA/NaT become empty cells, timestamps show to the minute, and a ``|``
    inside a cell is escaped, which tabulate does not do.
    """
    frame = df.reset_index() if index else df
    header = [str(c) for c in frame.columns]
    rows = [[_cell(v, floatfmt) for v in rec] for rec in frame.itertuples(index=False, name=None)]
    return markdown_table(header, rows)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Render already formatted cells; ``|`` inside a cell is escaped."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    out = [line(header), "|" + "|".join("---" for _ in header) + "|"]
    out.extend(line(r) for r in rows)
    return "\n".join(out)


def _cell(value: Any, floatfmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA or value is pd.NaT:
        return ""
    if isinstance(value, float):
        return format(value, floatfmt)
    if isinstance(value, pd.Timestamp):
        return value.strftime("%Y-%m-%d %H:%M")
    return str(value)


# ------------------------------------------------------------------ registry


@dataclass(frozen=True)
class Promotion:
    """Outcome of :func:`promote`; ``message`` is the one line the CLI prints."""

    promoted: bool
    message: str
    version: str | None = None


def _model_source(client: Any, run: Any, uri: str) -> tuple[str, str]:
    """(source URI, run id) of the model to register for ``run``.

    An evaluate run holds the test metrics but not the model; the model is then taken
    from the newest train run of the same commit (and DVC experiment, when tagged).
    """
    from vesselseg.mlflow_model import linked_model_source
    from vesselseg.tracking import MODEL_DIR, MODEL_FILE_DIR, MODEL_TAG

    linked = linked_model_source(client, run)  # linked by the model file's hash: no guessing
    if linked is not None:
        return linked
    tags = run.data.tags
    trains = []
    if tags.get("git_commit"):
        trains = [
            other
            for other in search(commit=tags["git_commit"], uri=uri)  # newest first
            if other.info.run_id != run.info.run_id and other.data.tags.get("stage") == "train"
        ]
    # The same DVC experiment's train run first; sorted() is stable, so newest next.
    trains = sorted(trains, key=lambda o: o.data.tags.get("dvc_exp_name") != tags.get("dvc_exp_name"))
    candidates = [run, *trains]
    for cand in candidates:
        if cand.data.tags.get(MODEL_TAG):
            return f"runs:/{cand.info.run_id}/{MODEL_DIR}", cand.info.run_id
        if client.list_artifacts(cand.info.run_id, MODEL_FILE_DIR):
            return f"{cand.info.artifact_uri}/{MODEL_FILE_DIR}", cand.info.run_id
    raise TrackingError(
        f"run {run.info.run_id}: no model logged by it or by a train run of commit {tags.get('git_commit', '?')[:8]}"
    )


def _holder_metric(client: Any, version: Any, metric: str) -> float | None:
    tagged = version.tags.get(f"metric.{metric}")
    if tagged is not None:
        return float(tagged)
    if version.run_id:
        value = client.get_run(version.run_id).data.metrics.get(metric)
        return None if value is None else float(value)
    return None


def promote(
    run_id: str,
    *,
    name: str,
    alias: str = "champion",
    metric: str = "test.dice",
    higher_is_better: bool = True,
    uri: str | None = None,
) -> Promotion:
    """Register ``run_id``'s model under ``name`` and move ``alias`` to it if it is better.

    "Better" compares ``metric`` of the run with the value recorded on the current
    alias holder (tag ``metric.<name>`` on the version, else its run's metric).  A
    run that does not beat the holder is not registered at all, so the registry only
    grows with models that were champions at some point.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = uri or default_tracking_uri()
    if sqlite_missing(uri):
        raise TrackingError(f"{uri}: no MLflow store (nothing was tracked yet)")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise TrackingError(f"run {run_id!r} not found in {uri}") from None
    value = run.data.metrics.get(metric)
    if value is None:
        known = ", ".join(sorted(run.data.metrics)) or "none"
        raise TrackingError(f"run {run_id}: metric {metric!r} not logged (known: {known})")
    try:
        holder = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        holder = None
    if holder is not None:
        best = _holder_metric(client, holder, metric)
        if best is not None:
            wins = value > best if higher_is_better else value < best
            if not wins:
                return Promotion(
                    False,
                    f"not promoted: {metric}={value:.4f} does not beat {name}@{alias} "
                    f"(version {holder.version}, {metric}={best:.4f})",
                    str(holder.version),
                )
    source, model_run = _model_source(client, run, uri)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    version = client.create_model_version(
        name,
        source=source,
        run_id=model_run,
        tags={f"metric.{metric}": str(value), "evaluated_by_run": run_id},
    )
    client.set_registered_model_alias(name, alias, version.version)
    before = f" (was version {holder.version})" if holder is not None else ""
    return Promotion(
        True,
        f"promoted: {name} version {version.version} is now @{alias}{before}, {metric}={value:.4f}",
        str(version.version),
    )
