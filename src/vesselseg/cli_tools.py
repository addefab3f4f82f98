"""The commands beside the pipeline stages: runs, the PR report, offline sync and model promotion.

Thin on purpose: each command parses options and calls one function of
:mod:`vesselseg.runs`, :mod:`vesselseg.report` or :mod:`vesselseg.tracking`, which are
imported only when the command runs (so ``vesselseg --help`` and every stage start
without MLflow).  :mod:`vesselseg.cli` registers every entry of :data:`COMMANDS` and
turns a :class:`~vesselseg.errors.VesselsegError` into a one-line message.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

log = logging.getLogger(__name__)


@click.command("runs")
@click.option("--experiment", default=None, help="MLflow experiment name (default: all experiments).")
@click.option("--dataset", default=None, help="Only runs tagged with this dataset.")
@click.option("--recipe", default=None, help="Only runs tagged with this recipe.")
@click.option("--commit", default=None, help="Only runs of this git commit (a prefix is enough).")
@click.option(
    "--sort", "sort_by", default=None, metavar="METRIC", help="Sort by this metric, best first (e.g. test.dice)."
)
@click.option("--ascending", is_flag=True, help="Sort lowest first (losses).")
@click.option("--md", "fmt", flag_value="md", default=True, help="Markdown table (default).")
@click.option("--csv", "fmt", flag_value="csv", help="CSV table.")
@click.option("--uri", default=None, help="Tracking URI (default: MLFLOW_TRACKING_URI or <repo>/mlflow.db).")
def runs_cmd(
    experiment: str | None,
    dataset: str | None,
    recipe: str | None,
    commit: str | None,
    sort_by: str | None,
    ascending: bool,
    fmt: str,
    uri: str | None,
) -> None:
    """List tracked runs with their tags, key params and metrics."""
    from vesselseg.runs import runs_table, to_markdown

    df = runs_table(
        experiment, dataset=dataset, recipe=recipe, commit=commit, sort_by=sort_by, ascending=ascending, uri=uri
    )
    if df.empty:
        click.echo("No runs found.", err=True)
        return
    click.echo(df.to_csv(index=False) if fmt == "csv" else to_markdown(df))


@click.command("report")
@click.option("--base", default=None, help="Base revision (default: git merge-base HEAD main).")
@click.option("--rev", default=None, help="Revision to report on (default: the workspace).")
@click.option("--out", "out_dir", default="pr-report", show_default=True, type=click.Path(path_type=Path))
@click.option("--repo", default=".", show_default=True, type=click.Path(path_type=Path, file_okay=False))
@click.option("--uri", default=None, help="Tracking URI for the MLflow runs table.")
def report_cmd(base: str | None, rev: str | None, out_dir: Path, repo: Path, uri: str | None) -> None:
    """Write OUT/report.md (+ figures) comparing two revisions, and print it."""
    from vesselseg.report import build_report

    path = build_report(base=base, rev=rev, out_dir=out_dir, repo=repo, uri=uri)
    click.echo(path.read_text(encoding="utf-8"))


@click.group("tracking")
def tracking_group() -> None:
    """MLflow tracking maintenance."""


@tracking_group.command("sync")
@click.option(
    "--uri", default=None, help="Tracking URI to replay to (default: MLFLOW_TRACKING_URI or <repo>/mlflow.db)."
)
def sync_cmd(uri: str | None) -> None:
    """Replay runs recorded offline (server down) to the tracking server."""
    from vesselseg.tracking import pending_offline, sync_offline

    n = sync_offline(uri)
    left = len(pending_offline())
    click.echo(f"synced {n} offline run(s); {left} left")


@click.command("promote")
@click.argument("run_id")
@click.option("--alias", default="champion", show_default=True)
@click.option("--metric", default="test.dice", show_default=True, help="Metric that decides (logged on RUN_ID).")
@click.option("--lower-is-better", is_flag=True, help="For losses: a smaller metric wins.")
@click.option(
    "--params",
    "params_path",
    default=None,
    type=click.Path(path_type=Path),
    help="Params file naming the registered model (tracking.experiment); default: the CLI's --params.",
)
@click.option("--uri", default=None, help="Tracking/registry URI.")
def promote_cmd(
    run_id: str, alias: str, metric: str, lower_is_better: bool, params_path: Path | None, uri: str | None
) -> None:
    """Register RUN_ID's model and move ALIAS to it if its METRIC beats the holder's."""
    from vesselseg.params import load_params
    from vesselseg.runs import promote

    if params_path is None:
        # The top-level `vesselseg --params FILE` when registered under the main CLI.
        root = click.get_current_context().find_root()
        params_path = Path(root.params.get("params_path") or root.params.get("params") or "params.yaml")
    name = load_params(params_path).tracking.experiment
    result = promote(run_id, name=name, alias=alias, metric=metric, higher_is_better=not lower_is_better, uri=uri)
    click.echo(result.message)


COMMANDS: list[click.Command] = [runs_cmd, report_cmd, tracking_group, promote_cmd]
