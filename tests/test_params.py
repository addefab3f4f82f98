"""The params schema: defaults load, bad values stop with one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vesselseg.errors import ParamsError
from vesselseg.params import Params, load_params

ROOT = Path(__file__).resolve().parents[1]


def test_repository_params_are_valid_and_complete() -> None:
    p = load_params(ROOT / "params.yaml")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    # every section of the schema is spelled out in params.yaml (one source of truth)
    assert set(raw) == set(Params.model_fields)
    for section, value in raw.items():
        if isinstance(value, dict):
            assert set(value) == set(type(getattr(p, section)).model_fields), section


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("data.dataset", "nosuchset", "data.dataset"),
        ("train.lr", -1.0, "train.lr"),
        ("train.lr", 0, "train.lr"),
        ("train.batch_size", 0, "train.batch_size"),
        ("patches.size", 0, "patches.size"),
        ("predict.overlap", 1.0, "predict.overlap"),
        ("predict.overlap", -0.1, "predict.overlap"),
        ("predict.weighting", "triangle", "predict.weighting"),
        ("train.loss", "focal", "train.loss"),
        ("model.name", "transformer", "model.name"),
        ("train.epochs", "many", "train.epochs"),
        ("train.typo_key", 1, "train.typo_key"),
        ("prepare.slab", [10, 5], "prepare.slab"),
        ("data.synthetic.slab", [0, 999], "data.synthetic"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, key: str, value: object, needle: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    with pytest.raises(ParamsError) as err:
        load_params(path, overrides={key: value})
    msg = str(err.value)
    assert needle in msg and "\n" not in msg
    assert str(path) in msg


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(ParamsError, match=r"params.yaml: line \d+: malformed YAML"):
        load_params(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_flat_keys() -> None:
    flat = Params().flat()
    assert flat["train.lr"] == 1e-3 and flat["data.synthetic.n_subjects"] == 16


def test_schema_defaults_are_the_shipped_params_yaml() -> None:
    """params.yaml is the one source of truth: the schema's defaults may not drift from it."""
    shipped = load_params(Path(__file__).resolve().parents[1] / "params.yaml").flat()
    defaults = Params().flat()
    drift = {k: (defaults.get(k, "<absent>"), shipped.get(k, "<absent>")) for k in set(shipped) | set(defaults)
             if defaults.get(k, "<absent>") != shipped.get(k, "<absent>")}
    assert not drift, f"schema default != params.yaml (key: (schema, yaml)): {drift}"
