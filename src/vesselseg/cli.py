"""The ``vesselseg`` command: the pipeline's stages and the tools a user runs by hand.

This module only parses options, loads the validated params and calls the library;
``stages/<name>.py`` (what ``dvc.yaml`` runs) are one-line calls into it, so a stage
run by DVC and the same command typed by hand behave identically.  Errors the user
can fix are printed as one line (``--debug`` for the traceback).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from vesselseg.errors import VesselsegError
from vesselseg.log import setup_logging
from vesselseg.params import Params, load_params

log = logging.getLogger("vesselseg")

os.environ.setdefault("DVC_NO_ANALYTICS", "1")

PathArg = click.Path(path_type=Path)


class Ctx:
    def __init__(self, params_path: Path, debug: bool) -> None:
        self.params_path = params_path
        self.debug = debug
        self._params: Params | None = None

    @property
    def params(self) -> Params:
        if self._params is None:
            self._params = load_params(self.params_path)
        return self._params


pass_ctx = click.make_pass_decorator(Ctx)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--params",
    "params_path",
    type=PathArg,
    default=Path("params.yaml"),
    show_default=True,
    help="The params file (the one source of truth for every setting).",
)
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.pass_context
def cli(ctx: click.Context, params_path: Path, debug: bool) -> None:
    """vesselseg: raw datasets -> trained U-Net -> predictions -> metric tables.

    Each pipeline stage (download, prepare, patches, train, predict, evaluate) is a
    subcommand; `dvc repro` runs them in order through stages/*.py.
    """
    setup_logging(debug)
    ctx.obj = Ctx(params_path, debug)


@contextlib.contextmanager
def _timed(stage: str) -> Iterator[None]:
    t0 = time.monotonic()
    yield
    log.info("stage %s finished in %.1f s", stage, time.monotonic() - t0)


@contextlib.contextmanager
def _tracked(stage: str, params: Params) -> Iterator[Any]:
    """An MLflow run for this stage (see vesselseg.tracking); a no-op logger if disabled."""
    from vesselseg.tracking import RunLogger

    if int(os.environ.get("RANK", "0")) > 0:
        # under torchrun only rank 0 logs: the other ranks get a disabled logger
        os.environ["VESSELSEG_TRACKING"] = "0"
    with RunLogger(stage=stage, experiment=params.tracking.experiment, params=params.flat()) as run:
        yield run


# -- pipeline stages ---------------------------------------------------------------


@cli.command()
@click.option("--out", type=PathArg, default=Path("data/raw"), show_default=True)
@pass_ctx
def download(c: Ctx, out: Path) -> None:
    """Materialise the dataset named by data.dataset under OUT (generated, downloaded or copied)."""
    from vesselseg.data.adapters import get_adapter

    p = c.params
    with _timed("download"):
        adapter = get_adapter(p.data.dataset)
        source = Path(p.data.source).expanduser() if p.data.source else None
        adapter.materialize(out, source=source, params=p.data)


@cli.command()
@click.option("--raw", type=PathArg, default=Path("data/raw"), show_default=True)
@click.option("--out", type=PathArg, default=Path("data/prepared"), show_default=True)
@pass_ctx
def prepare(c: Ctx, raw: Path, out: Path) -> None:
    """Project volumes, pick the channel, equalize, split into train/val/test."""
    from vesselseg.prepare import run_prepare

    with _timed("prepare"):
        run_prepare(raw_dir=raw, out_dir=out, data=c.params.data, prepare=c.params.prepare)


@cli.command()
@click.option("--prepared", type=PathArg, default=Path("data/prepared"), show_default=True)
@click.option("--out", type=PathArg, default=Path("data/patches"), show_default=True)
@pass_ctx
def patches(c: Ctx, prepared: Path, out: Path) -> None:
    """Extract (and optionally augment) training and validation patches."""
    from vesselseg.patches import run_patches

    p = c.params
    with _timed("patches"):
        run_patches(prepared_dir=prepared, out_dir=out, seed=p.seed, **p.patches.model_dump())


@cli.command()
@click.option("--patches", "patch_dir", type=PathArg, default=Path("data/patches"), show_default=True)
@click.option("--prepared", type=PathArg, default=Path("data/prepared"), show_default=True)
@click.option("--model", "model_path", type=PathArg, default=Path("models/model.pt"), show_default=True)
@click.option(
    "--checkpoint",
    type=PathArg,
    default=Path("models/checkpoint.pt"),
    show_default=True,
    help="Resume state, written every epoch and removed when training finishes.",
)
@click.option("--history", type=PathArg, default=Path("reports/train/history.csv"), show_default=True)
@click.option("--metrics", type=PathArg, default=Path("reports/train/metrics.json"), show_default=True)
@pass_ctx
def train(
    c: Ctx, patch_dir: Path, prepared: Path, model_path: Path, checkpoint: Path, history: Path, metrics: Path
) -> None:
    """Train model.name; keep the best epoch by validation score; resume after a kill.

    Each model family (src/vesselseg/families/) decides what it trains on: U-Nets on
    the patches, `ipn` on the prepared volumes, `resnet_patch` on patch centres,
    `knn`/`vesselness` on the prepared training images.
    """
    from vesselseg.families import get_family
    from vesselseg.families.base import TrainJob
    from vesselseg.preprocess.spec import preprocessing_spec

    p = c.params
    with _timed("train"), _tracked("train", p) as run:
        job = TrainJob(
            params=p,
            prepared_dir=prepared,
            patch_dir=patch_dir,
            model_path=model_path,
            checkpoint_path=checkpoint,
            history_path=history,
            metrics_path=metrics,
            logger=run,
            # no run id or time in the model file: equal params must give a byte-identical file.
            # The preprocessing spec lets `vesselseg segment` reproduce prepare on new images
            # from the model file alone; its threshold is the one validation scored with.
            model_extra={
                "recipe": p.recipe,
                "dataset": p.data.dataset,
                "preprocessing": preprocessing_spec(p.data, p.prepare, p.model, p.train.val_threshold),
            },
        )
        result = get_family(p.model.name).fit(job)
        run.log_metrics({f"final.{k}": float(v) for k, v in result.items() if isinstance(v, (int, float))})
        run.log_artifact(history)
        run.log_model(model_path)


@cli.command()
@click.option("--model", "model_path", type=PathArg, default=Path("models/model.pt"), show_default=True)
@click.option("--prepared", type=PathArg, default=Path("data/prepared"), show_default=True)
@click.option("--out", type=PathArg, default=Path("data/predictions"), show_default=True)
@pass_ctx
def predict(c: Ctx, model_path: Path, prepared: Path, out: Path) -> None:
    """Predict full validation and test images (sliding windows for networks).

    Which model family predicts is read from the model file itself, not from params.yaml.
    """
    from vesselseg.inference.predict import run_predict

    p = c.params
    with _timed("predict"):
        run_predict(
            model_path=model_path,
            prepared_dir=prepared,
            out_dir=out,
            predict=p.predict,
            device=p.train.device,
            amp=p.train.amp,
        )


@cli.command()
@click.option("--prepared", type=PathArg, default=Path("data/prepared"), show_default=True)
@click.option("--predictions", type=PathArg, default=Path("data/predictions"), show_default=True)
@click.option("--metrics", type=PathArg, default=Path("reports/metrics.json"), show_default=True)
@click.option("--per-image", type=PathArg, default=Path("reports/per_image.csv"), show_default=True)
@click.option("--plots", type=PathArg, default=Path("reports/plots"), show_default=True)
@click.option("--overlays", type=PathArg, default=Path("reports/figures/overlays"), show_default=True)
@click.option(
    "--model",
    "model_path",
    type=PathArg,
    default=Path("models/model.pt"),
    show_default=True,
    help="The model the predictions came from: its MLflow run is linked by the file's hash.",
)
@pass_ctx
def evaluate(
    c: Ctx,
    prepared: Path,
    predictions: Path,
    metrics: Path,
    per_image: Path,
    plots: Path,
    overlays: Path,
    model_path: Path,
) -> None:
    """Per-image and pooled metrics inside the FOV, ROC/PR curves and overlays."""
    from vesselseg.evaluate import run_evaluate
    from vesselseg.params import flatten

    p = c.params
    with _timed("evaluate"), _tracked("evaluate", p) as run:
        result = run_evaluate(
            prepared_dir=prepared,
            predictions_dir=predictions,
            metrics_path=metrics,
            per_image_path=per_image,
            plots_dir=plots,
            overlays_dir=overlays,
            threshold=p.predict.threshold,
            n_overlays=p.evaluate.n_overlays,
            curve_points=p.evaluate.curve_points,
        )
        run.log_metrics({k: float(v) for k, v in flatten(result).items() if isinstance(v, (int, float))})
        import pandas as pd

        run.log_table(pd.read_csv(per_image), "per_image.json")
        run.log_artifact(metrics)
        if not run.disabled and model_path.is_file():
            from vesselseg.mlflow_model import model_link_tags

            # link this run to the train run that logged this very file (by its hash),
            # so `promote` registers the model that was evaluated, not the newest one
            run.set_tags(model_link_tags(model_path, uri=run.uri))


# -- tools -------------------------------------------------------------------------


@cli.command("crossdataset")
@click.option(
    "--model",
    "models",
    multiple=True,
    required=True,
    metavar="NAME=MODEL.pt",
    help="A trained model file (repeat: one row per model).",
)
@click.option(
    "--dataset",
    "datasets",
    multiple=True,
    required=True,
    metavar="NAME=PREPARED_DIR",
    help="A prepared dataset, data/prepared of any run (repeat: one column per dataset).",
)
@click.option(
    "--split",
    "split_args",
    multiple=True,
    metavar="[NAME=]SPLIT",
    help="train | val | test (default) | all (every image); NAME=SPLIT for one dataset only.",
)
@click.option(
    "--out", type=PathArg, default=Path("reports/crossdataset"), show_default=True, help="Writes OUT.csv and OUT.md."
)
@pass_ctx
def crossdataset(
    c: Ctx, models: tuple[str, ...], datasets: tuple[str, ...], split_args: tuple[str, ...], out: Path
) -> None:
    """Score every model on every dataset: F1, AUC and clDice, a dataset x dataset table.

    Prediction settings (window, threshold, ...) come from params.yaml's predict section;
    each model's family and preprocessing come from its own file.
    """
    from vesselseg.crossdataset import parse_named, run_crossdataset

    named_models = parse_named(models, "model file")
    named_datasets = parse_named(datasets, "prepared dataset")
    split, per_dataset = "test", {}
    for arg in split_args:
        name, sep, value = arg.partition("=")
        if sep:
            per_dataset[name] = value
        else:
            split = arg
    p = c.params
    out.parent.mkdir(parents=True, exist_ok=True)
    cells = run_crossdataset(
        models=named_models,
        datasets=named_datasets,
        out=out,
        predict=p.predict,
        split=split,
        splits=per_dataset,
        device=p.train.device,
        amp=p.train.amp,
    )
    click.echo(out.with_suffix(".md").read_text())
    log.info("%d cells written to %s.{csv,md}", len(cells), out)


@cli.group()
def params() -> None:
    """Inspect and validate params.yaml."""


@params.command("check")
@pass_ctx
def params_check(c: Ctx) -> None:
    """Validate the params file against the schema; print nothing else when it is valid."""
    _ = c.params
    click.echo(f"{c.params_path}: ok")


@params.command("show")
@pass_ctx
def params_show(c: Ctx) -> None:
    """Print every setting with its resolved value (defaults included), dotted keys."""
    for k, v in c.params.flat().items():
        click.echo(f"{k} = {v}")


def _register_optional() -> None:
    """Commands owned by other modules (recipes, tracking tools), attached if present."""
    for module in ("vesselseg.recipes", "vesselseg.cli_tools", "vesselseg.segment"):
        try:
            mod = __import__(module, fromlist=["COMMANDS"])
        except ImportError as err:
            if err.name == module:
                continue
            raise
        for command in getattr(mod, "COMMANDS", []):
            cli.add_command(command)


_register_optional()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="vesselseg", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)
    except VesselsegError as err:
        if debug:
            raise
        click.echo(f"error: {err}", err=True)
        sys.exit(1)


def run_stage(stage: str) -> None:
    """Entry of ``stages/<stage>.py``: the same command DVC runs and a user can type."""
    main([stage, *sys.argv[1:]])


if __name__ == "__main__":
    main()
