"""Recipes: files valid against the schema, -S arguments that DVC reads back, the table, the benchmark."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from vesselseg.errors import ParamsError
from vesselseg.params import flatten, parse_params
from vesselseg.recipes import (
    dvc_set_args,
    hydra_value,
    list_recipes,
    load_recipe,
    merge_params,
    recipe_rows_from_mlflow,
    recipes,
    render_table,
    run_recipe,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
ISSUE_4 = {
    "patches-unet3": "unet", "unet-valid": "unet", "octa-unet4": "unet", "unet5-onecycle": "unet",
    "knn": "knn", "vesselness": "vesselness", "resnet-patch": "resnet_patch", "ipn": "ipn",
}


def _workspace_params() -> dict:
    """The working tree's params.yaml: the one that matches the schema these tests import
    (HEAD's may lag behind a schema change that is not committed yet)."""
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def _apply_like_dvc(params_file: Path, args: list[str]) -> None:
    """What `dvc exp run -S` does to params.yaml (DVC's own function, Hydra's grammar)."""
    from dvc.utils.hydra import apply_overrides

    values = [a for a in args if a != "-S"]
    apply_overrides(str(params_file), values)


def test_every_issue_recipe_exists_validates_and_is_described() -> None:
    found = {r.name: r for r in list_recipes(RECIPES)}
    assert set(found) == set(ISSUE_4)
    for base in (_workspace_params(), {}):  # over the project's params and over the schema defaults
        for name, model_name in ISSUE_4.items():
            tree = load_recipe(name, RECIPES)
            assert tree["recipe"] == name
            params = parse_params(merge_params(base, tree), f"{name} over params.yaml")
            assert params.recipe == name and params.model.name == model_name
            assert len(found[name].description) > 40 and not found[name].description.startswith("#")
    ipn = parse_params(merge_params(_workspace_params(), load_recipe("ipn", RECIPES)))
    assert ipn.prepare.volumes and ipn.data.dataset == "synthetic"
    two = parse_params(merge_params(_workspace_params(), load_recipe("octa-unet4", RECIPES)))
    assert two.model.out_channels == 2 and two.train.loss == "ce" and two.train.scheduler == "step"


def test_bad_recipes_are_refused_with_the_key_or_the_valid_names(tmp_path: Path) -> None:
    (tmp_path / "typo.yaml").write_text("# a typo\nrecipe: typo\ntrain:\n  lrr: 0.1\n")
    (tmp_path / "wrongname.yaml").write_text("recipe: other\n")
    (tmp_path / "range.yaml").write_text("recipe: range\nmodel:\n  dropout: 1.5\n")
    with pytest.raises(ParamsError, match=r"typo\.yaml: train\.lrr: unknown key"):
        load_recipe("typo", tmp_path)
    with pytest.raises(ParamsError, match="must set `recipe: wrongname`"):
        load_recipe("wrongname", tmp_path)
    with pytest.raises(ParamsError, match=r"model\.dropout"):
        load_recipe("range", tmp_path)
    with pytest.raises(ParamsError, match=r"unknown recipe 'vesselnes'.*valid: .*knn.*did you mean 'vesselness'"):
        load_recipe("vesselnes", RECIPES)


def test_merge_params_is_deep_and_does_not_mutate() -> None:
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 3}
    out = merge_params(base, {"a": {"c": [9]}, "e": {"f": None}})
    assert out == {"a": {"b": 1, "c": [9]}, "d": 3, "e": {"f": None}}
    assert base == {"a": {"b": 1, "c": [1, 2]}, "d": 3}


@pytest.mark.parametrize("name", sorted(ISSUE_4))
def test_dvc_set_args_round_trip_through_dvcs_parser(tmp_path: Path, name: str) -> None:
    base = _workspace_params()
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(base, sort_keys=False))
    recipe = load_recipe(name, RECIPES)
    args = dvc_set_args(recipe)
    assert args[::2] == ["-S"] * (len(args) // 2) and len(args) == 2 * len(flatten(recipe))
    _apply_like_dvc(params_file, args)
    got = yaml.safe_load(params_file.read_text())
    assert parse_params(got) == parse_params(merge_params(base, recipe))
    flat = flatten(got)
    for key, value in flatten(recipe).items():
        assert flat[key] == value, key


def test_hydra_values_survive_awkward_values(tmp_path: Path) -> None:
    tree = {"data": {"source": "/a b/c:d", "octa500": {"projection": "OCTA(ILM_OPL)", "label": "true"},
                     "folder": {"images": "1e-4", "labels": None, "fov": "it's"}},
            "prepare": {"slab": None}, "model": {"knn": {"k_grid": [1, 3]}, "vesselness": {"sigmas": [0.5, 2.0]}},
            "train": {"lr": 1e-05, "amp": False}}
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(_workspace_params()))
    _apply_like_dvc(params_file, dvc_set_args(tree))
    flat = flatten(yaml.safe_load(params_file.read_text()))
    for key, value in flatten(tree).items():
        if key == "train.lr":
            # DVC writes YAML 1.2 ("1e-05"), which PyYAML (YAML 1.1) reads as a string;
            # the schema coerces it back to the float
            assert float(flat[key]) == value and parse_params({"train": {"lr": flat[key]}}).train.lr == value
            continue
        assert flat[key] == value and type(flat[key]) is type(value), (key, flat[key])
    assert hydra_value("knn") == "knn" and hydra_value("true") == "'true'" and hydra_value(None) == "null"


def _git(repo: Path, *args: str) -> None:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, env=env)


@pytest.fixture
def git_repo(tmp_path: Path) -> Path:
    """A git repository whose committed params.yaml is the project's current one."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text(yaml.safe_dump(_workspace_params(), sort_keys=False))
    (repo / "dvc.yaml").write_text(
        "stages:\n  echo:\n    cmd: python -c \"import shutil; shutil.copy('params.yaml', 'seen.yaml')\"\n"
        "    params: [recipe, model, train]\n    outs:\n      - seen.yaml:\n          cache: false\n"
    )
    (repo / ".gitignore").write_text("seen.yaml\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "init")
    return repo


@pytest.fixture
def dvc_repo(git_repo: Path) -> Path:
    """The same repository with DVC initialised: `dvc exp run` works in it."""
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=git_repo, check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], cwd=git_repo, check=True)
    _git(git_repo, "add", "-A")
    _git(git_repo, "commit", "-q", "-m", "dvc init")
    return git_repo


def test_run_recipe_with_a_real_dvc_exp_run(dvc_repo: Path) -> None:
    params = dvc_repo / "params.yaml"
    committed = yaml.safe_load(params.read_text())
    # leftovers of an earlier workspace experiment: a key the recipe does not set
    dirty = merge_params(committed, {"train": {"lr": 0.5}, "patches": {"size": 40}})
    del dirty["model"]["vesselness"]["black_ridges"]  # a key the workspace file lacks: set with ++
    params.write_text(yaml.safe_dump(dirty, sort_keys=False))
    extra = ["model.vesselness.sigmas=[2.0]", "data.source=/x y/a:b"]
    argv = run_recipe("vesselness", repo=dvc_repo, recipes_root=RECIPES, extra_sets=extra)
    assert argv[:4] == ["dvc", "exp", "run", "-n"] and argv[4].startswith("vesselness-")
    assert "++model.vesselness.black_ridges=true" in argv and "train.lr=0.001" in argv
    expected = merge_params(committed, load_recipe("vesselness", RECIPES))
    expected["model"]["vesselness"]["sigmas"] = [2.0]
    expected["data"]["source"] = "/x y/a:b"
    assert parse_params(yaml.safe_load(params.read_text())) == parse_params(expected)
    assert parse_params(yaml.safe_load((dvc_repo / "seen.yaml").read_text())) == parse_params(expected)
    shown = subprocess.run([sys.executable, "-m", "dvc", "exp", "list", "--name-only"], cwd=dvc_repo,
                           capture_output=True, text=True, check=True).stdout
    assert argv[4] in shown.split()


def test_cli_dry_run_prints_the_command_and_checks_params_first(git_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(git_repo)
    shutil.copytree(RECIPES, git_repo / "recipes")
    runner = CliRunner()
    res = runner.invoke(recipes, ["run", "knn", "--queue", "--dry-run", "-S", "train.epochs=2"])
    assert res.exit_code == 0, res.output
    line = res.output.strip().splitlines()[-1]
    assert line.startswith("dvc exp run -n knn-") and " --queue " in line
    assert "-S model.name=knn" in line and "-S train.epochs=2" in line and "'model.knn.k_grid=[3, 5, 7, 9]'" in line
    res = runner.invoke(recipes, ["run", "knn", "--dry-run", "-S", "train.epochz=2"])
    assert isinstance(res.exception, ParamsError) and "train.epochz" in str(res.exception)
    res = runner.invoke(recipes, ["list"])
    assert res.exit_code == 0 and len(res.output.strip().splitlines()) == len(ISSUE_4)


def test_table_from_mlflow_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Row assembly from runs shaped like MlflowClient's (the search itself is vesselseg.runs')."""
    from types import SimpleNamespace

    import vesselseg.runs

    runs = []

    def run(stage: str, recipe: str, exp_name: str, start: int, end: int, metrics: dict[str, float]) -> None:
        tags = {"stage": stage, "recipe": recipe, "dataset": "drive", "dvc_exp_name": exp_name}
        runs.append(SimpleNamespace(info=SimpleNamespace(start_time=start, end_time=end, status="FINISHED"),
                                    data=SimpleNamespace(tags=tags, metrics=metrics)))

    run("train", "knn", "knn-aaa111", 1_000_000, 1_060_000, {"final.train_seconds": 55.0})
    run("evaluate", "knn", "knn-aaa111", 1_100_000, 1_125_000, {"test.dice": 0.61, "test.auc_roc": 0.9, "val.dice": 0.6})
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
    spec = importlib.util.spec_from_file_location("bench_recipes", ROOT / "benchmarks" / "recipes.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.timeout(240)
def test_benchmark_on_a_tiny_config_keeps_failed_rows(tmp_path: Path) -> None:
    bench = _load_benchmark()
    rdir = tmp_path / "recipes"
    rdir.mkdir()
    shutil.copy(RECIPES / "vesselness.yaml", rdir)
    # valid for the schema, fails at run time (in the data stage: the cheapest child process to fail)
    (rdir / "broken.yaml").write_text("# fails in download\nrecipe: broken\ndata:\n  dataset: folder\n"
                                      "  folder:\n    images: /nonexistent/*.png\nmodel:\n  name: vesselness\n")
    out = tmp_path / "recipes.md"
    code = bench.main([
        "--recipes-dir", str(rdir), "--dataset", "synthetic-fundus", "--source", "", "--workdir", str(tmp_path / "w"),
        "--out", str(out), "--cap-minutes", "3", "-S", "data.synthetic_fundus.n_images=5",
        "-S", "data.synthetic_fundus.size=48", "-S", "evaluate.n_overlays=0",
    ])
    assert code == 0
    lines = [ln for ln in out.read_text().splitlines() if ln.startswith("|")]
    assert len(lines) == 4  # header, separator, two recipes: none missing
    broken = next(ln for ln in lines if ln.startswith("| broken |"))
    assert "failed: data preparation: error: data.folder.images: pattern '/nonexistent/*.png' matches no" in broken
    ves = next(ln for ln in lines if ln.startswith("| vesselness |"))
    metrics = json.loads((tmp_path / "w" / "runs" / "vesselness-synthetic-fundus" / "reports" / "metrics.json").read_text())
    assert f"| {metrics['test']['dice']:.4f} |" in ves and "failed" not in ves


def test_benchmark_time_cap_kills_the_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _load_benchmark()
    monkeypatch.setattr(bench, "_CHILD", "import time\ntime.sleep(60)\n")
    ok, why, seconds = bench._run([], cwd=tmp_path, env=dict(os.environ), timeout_s=1.0, log_file=tmp_path / "log.txt")
    assert not ok and why == "time cap of 1 s reached" and seconds < 20
    monkeypatch.setattr(bench, "_CHILD", "import sys\nprint('Traceback ...')\nprint('ValueError: bad   thing')\nsys.exit(3)\n")
    ok, why, _ = bench._run([], cwd=tmp_path, env=dict(os.environ), timeout_s=30, log_file=tmp_path / "log.txt")
    assert not ok and why == "ValueError: bad thing"
