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
    drift = {
        k: (defaults.get(k, "<absent>"), shipped.get(k, "<absent>"))
        for k in set(shipped) | set(defaults)
        if defaults.get(k, "<absent>") != shipped.get(k, "<absent>")
    }
    assert not drift, f"schema default != params.yaml (key: (schema, yaml)): {drift}"


@pytest.mark.parametrize(
    ("overrides", "keys"),
    [
        # train.loss 'ce' is the two-class loss
        ({"train.loss": "ce"}, ("train.loss", "model.out_channels")),
        ({"model.out_channels": 2}, ("model.out_channels", "train.loss")),
        # the ResNet patch classifier has one logit: bce only
        ({"model.name": "resnet_patch", "train.loss": "dice"}, ("train.loss", "model.name")),
        # the IPN reads one-channel volumes, prepared with prepare.volumes
        ({"model.name": "ipn", "prepare.volumes": True, "model.in_channels": 3}, ("model.in_channels", "model.name")),
        ({"model.name": "ipn"}, ("prepare.volumes", "model.name")),
        # colour input needs a 3-channel network, and the other way round
        ({"prepare.channel": "rgb"}, ("model.in_channels", "prepare.channel")),
        ({"model.in_channels": 3}, ("model.in_channels", "prepare.channel")),
        # the classical baselines read one grey channel
        ({"model.name": "knn", "prepare.channel": "rgb"}, ("prepare.channel", "model.name")),
        ({"model.name": "vesselness", "model.in_channels": 3}, ("model.in_channels", "model.name")),
        # a W-Net stacks U-Nets, with same padding
        ({"model.name": "ipn", "prepare.volumes": True, "model.stacks": 2}, ("model.stacks", "model.name")),
        ({"model.stacks": 2, "model.padding": "valid"}, ("model.stacks", "model.padding")),
        # two classes only where the family has a softmax head
        (
            {"model.name": "resnet_patch", "model.out_channels": 2, "train.loss": "bce"},
            ("model.out_channels", "model.name"),
        ),
    ],
)
def test_cross_section_rules_name_both_keys(tmp_path: Path, overrides: dict, keys: tuple[str, str]) -> None:
    """`vesselseg params check` refuses what train would refuse later, naming both keys in one line."""
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    with pytest.raises(ParamsError) as err:
        load_params(path, overrides=overrides)
    msg = str(err.value)
    assert all(k in msg for k in keys) and "\n" not in msg and str(path) in msg, msg


@pytest.mark.parametrize(
    "overrides",
    [
        {"train.loss": "ce", "model.out_channels": 2},
        {"model.name": "resnet_patch", "train.loss": "bce"},
        {"model.name": "ipn", "prepare.volumes": True},
        {"prepare.channel": "rgb", "model.in_channels": 3},
        {"model.name": "knn", "prepare.channel": "grey"},
        {"model.stacks": 2},
    ],
)
def test_consistent_cross_section_settings_pass(tmp_path: Path, overrides: dict) -> None:
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    load_params(path, overrides=overrides)


def test_params_check_command_refuses_an_inconsistent_config(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from vesselseg.cli import cli

    path = tmp_path / "params.yaml"
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"]["loss"] = "ce"
    path.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(cli, ["--params", str(path), "params", "check"])
    assert res.exit_code != 0 and "model.out_channels" in str(res.exception)
