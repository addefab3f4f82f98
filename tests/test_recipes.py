"""Recipes and datasets as Hydra config groups: every file composes and validates, unknown
names and missing sources stop in one line, `recipes run` drives a real `dvc exp run`, the
table, the benchmark."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from tests.helpers import ROOT, load_benchmark
from vesselseg.errors import ParamsError
from vesselseg.params import parse_params
from vesselseg.recipes import (
    compose,
    list_choices,
    list_recipes,
    load_recipe,
    recipe_rows_from_mlflow,
    recipes,
    render_table,
    run_recipe,
    write_params,
)

CONF = ROOT / "conf"
ISSUE_4 = {
    "patches-unet3": "unet",
    "unet-valid": "unet",
    "octa-unet4": "unet",
    "unet5-onecycle": "unet",
    "knn": "knn",
    "vesselness": "vesselness",
    "resnet-patch": "resnet_patch",
    "ipn": "ipn",
}


def test_every_issue_recipe_exists_validates_and_is_described() -> None:
    found = {r.name: r for r in list_recipes(CONF)}
    # the issue's recipes and the default; the shipped pretrained models are the dataset
    # configs themselves (their cards: `dvc exp run -S dataset=drive|octa500-3m`)
    assert set(found) == {*ISSUE_4, "default"}
    for dataset in ("drive", "octa500-3m"):
        params = parse_params(compose([f"dataset={dataset}"], root=CONF))
        assert params.recipe == "default" and params.train.scheduler == "onecycle" and params.train.max_minutes == 0
        assert params.predict.tta == "d4" and params.predict.window is None
    for name, model_name in ISSUE_4.items():
        assert load_recipe(name, CONF)["recipe"] == name
        params = parse_params(compose([f"recipe={name}"], root=CONF))
        assert params.recipe == name and params.model.name == model_name
        assert len(found[name].description) > 40 and "@package" not in found[name].description
    ipn = parse_params(compose(["recipe=ipn"], root=CONF))
    assert ipn.prepare.volumes and ipn.data.dataset == "synthetic"
    two = parse_params(compose(["recipe=octa-unet4", "dataset=octa500-3m"], root=CONF))
    assert two.model.out_channels == 2 and two.train.loss == "ce" and two.train.scheduler == "step"
    assert two.data.dataset == "octa500" and two.patches.size == 64  # the recipe wins over the dataset


def _conf_copy(tmp_path: Path) -> Path:
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    return conf


def test_bad_recipes_are_refused_with_the_key_or_the_valid_names(tmp_path: Path) -> None:
    conf = _conf_copy(tmp_path)
    (conf / "recipe" / "typo.yaml").write_text("# @package _global_\n# a typo\nrecipe: typo\ntrain:\n  lrr: 0.1\n")
    (conf / "recipe" / "wrongname.yaml").write_text("# @package _global_\nrecipe: other\n")
    (conf / "recipe" / "range.yaml").write_text("# @package _global_\nrecipe: range\nmodel:\n  dropout: 1.5\n")
    with pytest.raises(ParamsError, match=r"recipe=typo: train\.lrr: unknown key"):
        compose(["recipe=typo"], root=conf)
    with pytest.raises(ParamsError, match="must set `recipe: wrongname`"):
        load_recipe("wrongname", conf)
    with pytest.raises(ParamsError, match=r"model\.dropout"):
        compose(["recipe=range"], root=conf)
    with pytest.raises(ParamsError, match=r"unknown recipe 'vesselnes'.*valid: .*knn.*did you mean 'vesselness'"):
        load_recipe("vesselnes", CONF)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["dataset=drivee"], r"conf/dataset: unknown dataset 'drivee' \(valid: .*\); did you mean 'drive'\?"),
        (["recipe=knnn"], r"conf/recipe: unknown recipe 'knnn' \(valid: .*\); did you mean 'knn'\?"),
        (["recipe=knn,nope"], r"unknown recipe 'nope'"),  # a sweep: every choice is checked
        (["train.lrr=1"], r"Could not override 'train\.lrr'"),
        (["train.lr=-1"], r"train\.lr: Input should be greater than 0"),
    ],
    ids=["unknown-dataset", "unknown-recipe", "unknown-in-sweep", "unknown-key", "bad-value"],
)
def test_compose_refuses_in_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ParamsError, match=message) as info:
        compose(overrides, root=CONF)
    assert "\n" not in str(info.value)


def test_every_dataset_config_composes_and_names_its_adapter() -> None:
    names = {c.name: c for c in list_choices("dataset", CONF)}
    assert {"synthetic", "synthetic-fundus", "drive", "octa500-3m", "stare", "chase_db1", "hrf", "folder"} <= set(names)
    for name, choice in names.items():
        params = parse_params(compose([f"dataset={name}"], root=CONF))
        adapter = "octa500" if name.startswith("octa500") else name
        assert params.data.dataset == adapter and params.recipe == "default", name
        assert choice.path.read_text().startswith("# @package _global_\n") and len(choice.description) > 40, name
    assert parse_params(compose(["dataset=hrf"], root=CONF)).prepare.scale == 0.5
    assert parse_params(compose(["dataset=octa500-6m"], root=CONF)).data.octa500.subset == "6M"


def _git(repo: Path, *args: str) -> None:
    env = dict(
        os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t"
    )
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, env=env)


@pytest.fixture
def git_repo(tmp_path: Path) -> Path:
    """A git repository with the project's conf/ and its composed params.yaml."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(CONF, repo / "conf")
    write_params(repo / "params.yaml", root=repo)
    (repo / "dvc.yaml").write_text(
        "stages:\n  echo:\n    cmd: python -c \"import shutil; shutil.copy('params.yaml', 'seen.yaml')\"\n"
        "    params: [recipe, data, model, train]\n    outs:\n      - seen.yaml:\n          cache: false\n"
    )
    (repo / ".gitignore").write_text("seen.yaml\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "init")
    return repo


@pytest.fixture
def dvc_repo(git_repo: Path) -> Path:
    """The same repository with DVC initialised and Hydra composition on: `dvc exp run` works in it."""
    for args in (["init", "-q"], ["config", "core.analytics", "false"], ["config", "hydra.enabled", "true"]):
        subprocess.run([sys.executable, "-m", "dvc", *args], cwd=git_repo, check=True, capture_output=True)
    _git(git_repo, "add", "-A")
    _git(git_repo, "commit", "-q", "-m", "dvc init")
    return git_repo


@pytest.mark.timeout(240)
def test_run_recipe_with_a_real_dvc_exp_run_leaves_no_leftovers(dvc_repo: Path, tmp_path: Path) -> None:
    params = dvc_repo / "params.yaml"
    source = tmp_path / "my data (v2)"
    source.mkdir()
    # leftovers of an earlier workspace experiment that the recipe does not set: Hydra
    # recomposes params.yaml from conf/, so they vanish without any reset of ours
    dirty = yaml.safe_load(params.read_text())
    dirty["train"]["lr"] = 0.5
    dirty["patches"]["size"] = 40
    params.write_text(yaml.safe_dump(dirty, sort_keys=False))
    extra = ["model.vesselness.sigmas=[2.0]", f"data.source='{source}'"]
    argv = run_recipe("vesselness", dataset="synthetic-fundus", repo=dvc_repo, extra_sets=extra)
    assert argv[:4] == ["dvc", "exp", "run", "-n"] and argv[4].startswith("vesselness-")
    assert argv[5:] == ["-S", "recipe=vesselness", "-S", "dataset=synthetic-fundus", "-S", extra[0], "-S", extra[1]]
    expected = parse_params(compose(["recipe=vesselness", "dataset=synthetic-fundus", *extra], root=dvc_repo))
    assert expected.train.lr == 0.001 and expected.model.vesselness.sigmas == (2.0,)
    assert expected.data.source == str(source)
    assert parse_params(yaml.safe_load(params.read_text())) == expected
    assert parse_params(yaml.safe_load((dvc_repo / "seen.yaml").read_text())) == expected
    shown = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "list", "--name-only"],
        cwd=dvc_repo,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert argv[4] in shown.split()


def test_cli_dry_run_prints_the_command_and_checks_params_first(
    git_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(git_repo)
    runner = CliRunner()
    res = runner.invoke(recipes, ["run", "knn", "--queue", "--dry-run", "-S", "train.epochs=2"])
    assert res.exit_code == 0, res.output
    line = res.output.strip().splitlines()[-1]
    assert line.startswith("dvc exp run -n knn-") and line.endswith(" --queue -S recipe=knn -S train.epochs=2")
    res = runner.invoke(recipes, ["run", "knn", "--dry-run", "-S", "train.epochs=0"])
    assert isinstance(res.exception, ParamsError) and "train.epochs" in str(res.exception)
    res = runner.invoke(recipes, ["list"])
    assert res.exit_code == 0 and all(f"  {name} " in res.output for name in ISSUE_4)
    res = runner.invoke(recipes, ["show", "knn"])
    assert res.exit_code == 0 and res.output.rstrip().endswith("dvc exp run -S recipe=knn")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["knn", "--dataset", "drivee"], "error: {conf}/dataset: unknown dataset 'drivee' (valid: "),
        (["knnn"], "error: {conf}/recipe: unknown recipe 'knnn' (valid: "),
        (
            ["knn", "--dataset", "drive", "-S", "data.source=/nonexistent/DRIVE"],
            "error: data.source: /nonexistent/DRIVE does not exist",
        ),
    ],
    ids=["unknown-dataset", "unknown-recipe", "missing-source"],
)
def test_recipes_run_stops_in_one_line_before_any_work(git_repo: Path, args: list[str], message: str) -> None:
    """Exit 1, one line on stderr, and no DVC call: the command is checked before it starts."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    res = subprocess.run(
        [sys.executable, "-m", "vesselseg.cli", "recipes", "run", *args],
        cwd=git_repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message.format(conf=git_repo / "conf")), res.stderr
    assert res.stdout == ""  # the dvc command is printed only once every check passed


def test_table_from_mlflow_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Row assembly from runs shaped like MlflowClient's (the search itself is vesselseg.runs')."""
    from types import SimpleNamespace

    import vesselseg.runs

    runs = []

    def run(stage: str, recipe: str, exp_name: str, start: int, end: int, metrics: dict[str, float]) -> None:
        tags = {"stage": stage, "recipe": recipe, "dataset": "drive", "dvc_exp_name": exp_name}
        runs.append(
            SimpleNamespace(
                info=SimpleNamespace(start_time=start, end_time=end, status="FINISHED"),
                data=SimpleNamespace(tags=tags, metrics=metrics),
            )
        )

    run("train", "knn", "knn-aaa111", 1_000_000, 1_060_000, {"final.train_seconds": 55.0})
    run(
        "evaluate", "knn", "knn-aaa111", 1_100_000, 1_125_000, {"test.dice": 0.61, "test.auc_roc": 0.9, "val.dice": 0.6}
    )
    run("train", "knn", "knn-bbb222", 2_000_000, 2_010_000, {"final.train_seconds": 9.0})  # newer, never evaluated
    run("evaluate", "vesselness", "vesselness-ccc", 3_000_000, 3_001_000, {"test.dice": 0.55})

    def search(experiment=None, *, recipe=None, uri=None, **_):
        found = [r for r in runs if r.data.tags["recipe"] == recipe]
        return sorted(found, key=lambda r: -r.info.start_time)

    monkeypatch.setattr(vesselseg.runs, "search", search)
    rows = recipe_rows_from_mlflow(["knn", "vesselness", "ipn"], uri="sqlite:///unused.db")
    knn, ves, ipn = rows
    assert knn.metrics["test.dice"] == pytest.approx(0.61) and knn.train_seconds == pytest.approx(55.0)
    assert knn.wall_seconds == pytest.approx(125.0) and knn.note == "knn-aaa111"
    assert ves.metrics["test.dice"] == pytest.approx(0.55) and ves.wall_seconds is None
    assert ipn.note.startswith("not run") and ipn.metrics == {}
    table = render_table(rows).splitlines()
    assert len(table) == 5 and table[2].startswith("| knn | drive | 0.6100 |") and "2m05s" in table[2]
    assert "| ipn |" in table[4]


def _load_benchmark():
    return load_benchmark("recipes.py", "bench_recipes")


@pytest.mark.timeout(240)
@pytest.mark.slow
def test_benchmark_on_a_tiny_config_keeps_failed_rows(tmp_path: Path) -> None:
    bench = _load_benchmark()
    conf = _conf_copy(tmp_path)
    # valid for the schema, fails at run time (in the data stage: the cheapest child process to fail)
    (conf / "recipe" / "broken.yaml").write_text(
        "# @package _global_\n# fails in download\nrecipe: broken\ndata:\n  dataset: folder\n"
        "  folder:\n    images: /nonexistent/*.png\nmodel:\n  name: vesselness\n"
    )
    out = tmp_path / "recipes.md"
    code = bench.main(
        [
            "--conf-dir",
            str(conf),
            "--recipes",
            "vesselness",
            "broken",
            "--dataset",
            "synthetic-fundus",
            "--workdir",
            str(tmp_path / "w"),
            "--out",
            str(out),
            "--cap-minutes",
            "3",
            "-S",
            "data.synthetic_fundus.n_images=5",
            "-S",
            "data.synthetic_fundus.size=48",
            "-S",
            "evaluate.n_overlays=0",
        ]
    )
    assert code == 0
    lines = [ln for ln in out.read_text().splitlines() if ln.startswith("|")]
    assert len(lines) == 4  # header, separator, two recipes: none missing
    broken = next(ln for ln in lines if ln.startswith("| broken |"))
    assert "failed: data preparation: error: data.folder.images: pattern '/nonexistent/*.png' matches no" in broken
    ves = next(ln for ln in lines if ln.startswith("| vesselness |"))
    metrics = json.loads(
        (tmp_path / "w" / "runs" / "vesselness-synthetic-fundus" / "reports" / "metrics.json").read_text()
    )
    assert f"| {metrics['test']['dice']:.4f} |" in ves and "failed" not in ves


def test_benchmark_time_cap_kills_the_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _load_benchmark()
    monkeypatch.setattr(bench, "_CHILD", "import time\ntime.sleep(60)\n")
    ok, why, seconds = bench._run([], cwd=tmp_path, env=dict(os.environ), timeout_s=1.0, log_file=tmp_path / "log.txt")
    assert not ok and why == "time cap of 1 s reached" and seconds < 20
    monkeypatch.setattr(
        bench, "_CHILD", "import sys\nprint('Traceback ...')\nprint('ValueError: bad   thing')\nsys.exit(3)\n"
    )
    ok, why, _ = bench._run([], cwd=tmp_path, env=dict(os.environ), timeout_s=30, log_file=tmp_path / "log.txt")
    assert not ok and why == "ValueError: bad thing"
