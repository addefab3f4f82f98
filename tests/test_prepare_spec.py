"""The preprocessing spec: prepare and segment share one implementation; resolution harmonisation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vesselseg import imagefiles
from vesselseg.data.adapters import get_adapter
from vesselseg.errors import ParamsError
from vesselseg.params import DataParams, ModelParams, PrepareParams, parse_params
from vesselseg.prepare import NATIVE_SIZES, native_sizes, run_prepare
from vesselseg.preprocess.spec import (
    fov_diameter,
    image_spec,
    preprocess_image,
    preprocessing_spec,
    to_native,
)


@pytest.fixture(scope="module")
def fundus_raw(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DataParams]:
    data = DataParams(dataset="synthetic-fundus", synthetic_fundus={"n_images": 4, "size": 96})
    raw = tmp_path_factory.mktemp("fundus") / "raw"
    get_adapter(data.dataset).materialize(raw, source=None, params=data)
    return raw, data


def test_spec_is_plain_json_and_carries_every_setting() -> None:
    spec = preprocessing_spec(
        DataParams(dataset="drive"),
        PrepareParams(gamma=1.3, equalize="global"),
        ModelParams(in_channels=1, input_norm=True),
        0.42,
    )
    assert json.loads(json.dumps(spec)) == spec
    assert spec["channel"] == "green" and spec["gamma"] == 1.3 and spec["equalize"]["method"] == "global"
    assert spec["threshold"] == 0.42 and spec["in_channels"] == 1 and spec["input"]["input_norm"] is True
    assert spec["input"]["scaling"] == "divide_255" and spec["fov"]["rule"] == "derive"
    assert spec["resolution"] == {"scale": 1.0, "fov_diameter": None} and spec["version"] == 1
    assert image_spec(DataParams(dataset="octa500"), PrepareParams())["fov"]["rule"] == "full"


def test_prepared_images_equal_preprocess_image_of_the_raw_files(
    fundus_raw: tuple[Path, DataParams], tmp_path: Path
) -> None:
    """One implementation: what prepare wrote is exactly what segment would compute."""
    raw, data = fundus_raw
    prepare = PrepareParams(gamma=1.2)
    run_prepare(raw_dir=raw, out_dir=tmp_path / "prep", data=data, prepare=prepare)
    spec = image_spec(data, prepare)
    samples = get_adapter(data.dataset).samples(raw, data)
    assert samples
    for s in samples:
        image = imagefiles.read_image(s.image)
        fov = imagefiles.read_mask(s.fov, image.shape[:2], "FOV mask")
        ours = preprocess_image(image, spec, fov=fov)
        assert np.array_equal(imagefiles.read_image(tmp_path / "prep" / "images" / f"{s.id}.png"), ours.image)
    assert not (tmp_path / "prep" / NATIVE_SIZES).exists()  # nothing resized: no new file, same bytes as before


def test_fov_diameter_resizes_image_label_and_fov_and_stores_native_sizes(
    fundus_raw: tuple[Path, DataParams], tmp_path: Path
) -> None:
    raw, data = fundus_raw
    run_prepare(raw_dir=raw, out_dir=tmp_path / "prep", data=data, prepare=PrepareParams(fov_diameter=64))
    sizes = native_sizes(tmp_path / "prep")
    assert sizes and all(v == (96, 96) for v in sizes.values())
    for id_ in sizes:
        fov = imagefiles.read_mask(tmp_path / "prep" / "fov" / f"{id_}.png")
        label = imagefiles.read_mask(tmp_path / "prep" / "labels" / f"{id_}.png")
        assert label.shape == fov.shape == imagefiles.read_image(tmp_path / "prep" / "images" / f"{id_}.png").shape[:2]
        assert abs(fov_diameter(fov) - 64) <= 1


def test_fov_diameter_and_scale_are_exclusive_with_one_line_naming_both() -> None:
    with pytest.raises(ParamsError, match=r"prepare\.fov_diameter and prepare\.scale are exclusive") as err:
        parse_params({"prepare": {"fov_diameter": 500, "scale": 0.5}})
    assert "\n" not in str(err.value)
    assert parse_params({"prepare": {"fov_diameter": 500}}).prepare.fov_diameter == 500


def test_volume_datasets_keep_their_size() -> None:
    for dataset in ("octa500", "synthetic"):
        spec = image_spec(DataParams(dataset=dataset), PrepareParams(fov_diameter=500))
        assert spec["resolution"]["fov_diameter"] is None
        image = (np.arange(64 * 48) % 251).astype(np.uint8).reshape(64, 48)
        assert preprocess_image(image, spec).image.shape == (64, 48)


def test_diameter_is_the_larger_bounding_box_side_so_a_cropped_disc_measures_the_same() -> None:
    yy, xx = np.mgrid[:200, :200]
    disc = (yy - 100) ** 2 + (xx - 100) ** 2 <= 80**2
    cropped = disc[40:160]  # top and bottom cut off, as many cameras do
    assert fov_diameter(disc) == fov_diameter(cropped) == 161


def test_to_native_maps_back_and_is_identity_at_native_size() -> None:
    probs = np.linspace(0, 1, 50 * 40, dtype=np.float32).reshape(50, 40)
    assert to_native(probs, (50, 40)) is probs
    up = to_native(probs, (100, 80))
    assert up.shape == (100, 80) and up.dtype == np.float32 and up.min() >= 0.0 and up.max() <= 1.0
    assert to_native(probs, (25, 20)).shape == (25, 20)


def test_fov_is_derived_for_fundus_specs_and_full_otherwise() -> None:
    yy, xx = np.mgrid[:96, :96]
    disc = (yy - 48) ** 2 + (xx - 48) ** 2 <= 40**2
    rgb = np.stack([disc * 200, disc * 120, disc * 40], axis=-1).astype(np.uint8)
    fundus = preprocess_image(rgb, image_spec(DataParams(dataset="drive"), PrepareParams()))
    assert fundus.fov_derived and abs(int(fundus.fov.sum()) - int(disc.sum())) < 0.03 * disc.sum()
    assert not fundus.image[~fundus.fov].any()
    octa = preprocess_image(rgb[..., 1], image_spec(DataParams(dataset="octa500"), PrepareParams()))
    assert octa.fov.all()
