"""The repository's DVC layout as DVC users expect it: params.yaml is the Hydra composition
of conf/, each plot is declared once with axes and title, image outputs stay off remotes,
and DVC ignores our temporary names."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vesselseg.recipes import PARAMS_HEADER, compose, params_text

ROOT = Path(__file__).resolve().parents[1]
# outputs holding a dataset's images or anything derived from them image by image
IMAGE_OUTPUTS = {"data/raw", "data/prepared", "data/patches", "data/predictions", "reports/figures/overlays"}
CSV_PLOTS = {"reports/train/history.csv", "reports/plots/roc.csv", "reports/plots/pr.csv"}


def _dvc_yaml() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


def _outs(stage: dict, kind: str = "outs") -> dict[str, dict]:
    """``{path: options}`` of a stage's ``outs``/``metrics`` list (a bare string has no options)."""
    out: dict[str, dict] = {}
    for item in stage.get(kind, []):
        if isinstance(item, str):
            out[item] = {}
        else:
            ((path, opts),) = item.items()
            out[path] = opts or {}
    return out


def test_params_yaml_is_the_composition_of_the_defaults() -> None:
    """What `dvc repro` reads equals what `dvc exp run` (no -S) writes, header aside."""
    text = (ROOT / "params.yaml").read_text()
    assert text.startswith(PARAMS_HEADER), "params.yaml must open with the generated-file header"
    assert text == params_text(root=ROOT), "params.yaml is stale: run `vesselseg recipes compose`"
    assert yaml.safe_load(text) == compose(root=ROOT)


def test_dvc_config_enables_hydra_on_conf() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / ".dvc" / "config")
    assert cfg.getboolean("hydra", "enabled")
    assert cfg.get("hydra", "config_dir", fallback="conf") == "conf"
    assert cfg.get("hydra", "config_name", fallback="config") == "config"
    defaults = yaml.safe_load((ROOT / "conf" / "config.yaml").read_text())["defaults"]
    assert defaults == ["_self_", {"dataset": "synthetic"}, {"recipe": "default"}]


def test_each_plot_is_declared_once_with_axes_and_title() -> None:
    dvc = _dvc_yaml()
    for name, stage in dvc["stages"].items():
        assert "plots" not in stage, f"stage {name}: plots belong to the top-level section only"
    seen: list[str] = []
    for entry in dvc["plots"]:
        if isinstance(entry, str):  # an image folder: rendered as images, no axes
            assert entry == "reports/figures/overlays"
            continue
        ((pid, spec),) = entry.items()
        for key in ("title", "x", "y", "x_label", "y_label", "template"):
            assert spec.get(key), f"plot {pid}: no {key}"
        for path, fields in spec["y"].items():
            seen += [f"{path}:{f}" for f in ([fields] if isinstance(fields, str) else fields)]
    assert len(seen) == len(set(seen)), "a series is plotted twice"
    assert {s.split(":")[0] for s in seen} == CSV_PLOTS


def test_plot_csvs_are_tracked_git_outputs_and_image_outputs_are_not_pushed() -> None:
    stages = _dvc_yaml()["stages"]
    outs = {path: opts for stage in stages.values() for path, opts in _outs(stage).items()}
    metrics = {path: opts for stage in stages.values() for path, opts in _outs(stage, "metrics").items()}
    for path in CSV_PLOTS | {"reports/per_image.csv"}:
        assert outs[path].get("cache") is False, path
    for path in ("reports/metrics.json", "reports/train/metrics.json"):
        assert metrics[path].get("cache") is False, path
    for path in IMAGE_OUTPUTS:
        assert outs[path].get("push") is False, f"{path}: holds licensed images, must be push: false"
    pushed = {p for p, o in outs.items() if o.get("push", True) and o.get("cache", True)}
    assert pushed == {"models/model.pt"}, "the only output a remote receives is the model"


@pytest.mark.timeout(120)
def test_dvcignore_covers_the_temporaries_atomic_writes(tmp_path: Path) -> None:
    """Names made the way vesselseg.atomic makes them, checked by DVC itself."""
    from vesselseg.atomic import _TEMP_NAME

    pid = os.getpid()
    names = [
        f"data/prepared/.tmp-{pid}-images-k2j_x",
        f"data/.old-{pid}-predictions",
        f"reports/.tmp-{pid}-metrics-ab12.json",
        f"data/.tmp-{pid}-scratch-drive-q1",
    ]
    assert all(_TEMP_NAME.match(Path(n).name) for n in names), "atomic's naming scheme changed: update .dvcignore"
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "dvc", "check-ignore", *names],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert res.returncode == 0, res.stderr
    assert sorted(res.stdout.split()) == sorted(names)
    res = subprocess.run(
        [sys.executable, "-m", "dvc", "check-ignore", "data/prepared/images", "reports/metrics.json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert res.returncode == 1 and res.stdout.strip() == "", "ordinary outputs must not be ignored"
