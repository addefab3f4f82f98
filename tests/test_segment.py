"""vesselseg segment: any image in, maps out, bad files reported one line each."""

from __future__ import annotations

import csv
import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from tests.helpers import SHARED, line_scene
from vesselseg import segment as seg
from vesselseg.cli import main
from vesselseg.errors import DataError
from vesselseg.params import DataParams, ModelParams, PrepareParams

TINY = {"name": "unet", "in_channels": 1, "depth": 2, "base_channels": 4, "dropout": 0.0}


def tiny_spec(dataset: str = "synthetic-fundus", threshold: float = 0.5, **prepare: object) -> dict:
    from vesselseg.preprocess.spec import preprocessing_spec

    return preprocessing_spec(
        DataParams(dataset=dataset),
        PrepareParams(**prepare),
        ModelParams(depth=2, base_channels=4, dropout=0.0),
        threshold,
    )


def tiny_model_file(path: Path, spec: dict | None = None, steps: int = 40, extra: dict | None = None) -> Path:
    """A 2-level U-Net trained for a few seconds on bright-line scenes (seeded)."""
    import torch

    from vesselseg.models import build_model, save_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 busy shared cores: two threads are 10x slower than one here
    torch.manual_seed(0)
    model = build_model(TINY)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scenes = [line_scene(s, size=48, fov_all=True) for s in range(8)]
    x = torch.from_numpy(np.stack([s[0] for s in scenes])[:, None].astype(np.float32) / 255)
    y = torch.from_numpy(np.stack([s[1] for s in scenes])[:, None].astype(np.float32))
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    model.eval()
    full = {**(extra or {})}
    if spec is not False:
        full["preprocessing"] = spec if spec is not None else tiny_spec()
    save_model(path, model, TINY, extra=full or None)
    return path


def fundus_rgb(seed: int = 0, size: int = 96) -> np.ndarray:
    """An RGB "fundus": a bright disc on black with dark lines in it."""
    image, _label, _ = line_scene(seed, size=size, fov_all=True)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= (0.45 * size) ** 2
    g = np.where(disc, 255 - image // 2, 0).astype(np.uint8)
    rgb = np.stack([np.where(disc, 200, 0), g, np.where(disc, 60, 0)], axis=-1).astype(np.uint8)
    return rgb


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_file(tmp_path_factory.mktemp("model") / "model.pt")


def _write_formats(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rgb = fundus_rgb(0)
    grey = rgb[..., 1]
    out = []
    Image.fromarray(rgb).save(folder / "a_rgb.png")
    out.append(folder / "a_rgb.png")
    Image.fromarray(rgb).save(folder / "b.jpg", quality=95)
    out.append(folder / "b.jpg")
    tifffile.imwrite(folder / "c16.tif", grey.astype(np.uint16) * 257)
    out.append(folder / "c16.tif")
    Image.fromarray(rgb).save(folder / "d.ppm")
    out.append(folder / "d.ppm")
    (folder / "e.ppm.gz").write_bytes(gzip.compress((folder / "d.ppm").read_bytes()))
    out.append(folder / "e.ppm.gz")
    Image.fromarray(grey).save(folder / "f.gif")
    out.append(folder / "f.gif")
    Image.fromarray(rgb).save(folder / "g.bmp")
    out.append(folder / "g.bmp")
    rgba = np.concatenate([rgb, np.full((*rgb.shape[:2], 1), 255, np.uint8)], axis=-1)
    Image.fromarray(rgba).save(folder / "h_rgba.png")
    out.append(folder / "h_rgba.png")
    Image.fromarray(grey).save(folder / "i_grey.png")
    out.append(folder / "i_grey.png")
    return out


def test_segment_reads_every_format_and_writes_maps_mask_overlay_and_csv(model_file: Path, tmp_path: Path) -> None:
    files = _write_formats(tmp_path / "in")
    result = seg.run_segment([tmp_path / "in"], model=model_file, out_dir=tmp_path / "out")
    assert result["failed"] == {}
    assert len(result["ok"]) == len(files)
    for f in files:
        stem = seg._stem(f)
        probs = np.asarray(Image.open(tmp_path / "out" / f"{stem}_probs.png"))
        assert probs.dtype == np.uint16 and probs.shape == (96, 96)
        mask = np.asarray(Image.open(tmp_path / "out" / f"{stem}_mask.png"))
        assert set(np.unique(mask)) <= {0, 255}
        assert np.asarray(Image.open(tmp_path / "out" / f"{stem}_overlay.png")).shape == (96, 96, 3)
    rows = list(csv.DictReader((tmp_path / "out" / "segment.csv").open()))
    assert [r["file"] for r in rows] == [str(f) for f in files]
    assert all(0.0 < float(r["vessel_density"]) < 1.0 for r in rows)
    assert all(int(r["height"]) == 96 and int(r["width"]) == 96 for r in rows)
    # gz and plain PPM hold the same pixels: the same map
    a = np.asarray(Image.open(tmp_path / "out" / "d_probs.png"))
    b = np.asarray(Image.open(tmp_path / "out" / "e_probs.png"))
    assert np.array_equal(a, b)


def test_float_tiff_probabilities_match_the_predictor(model_file: Path, tmp_path: Path) -> None:
    Image.fromarray(fundus_rgb(1)).save(tmp_path / "x.png")
    seg.run_segment([tmp_path / "x.png"], model=model_file, out_dir=tmp_path / "out", probs_format="tiff")
    probs = tifffile.imread(tmp_path / "out" / "x_probs.tif")
    assert probs.dtype == np.float32
    predictor = seg.load_predictor(model_file, device="cpu")
    direct = seg.segment_image(fundus_rgb(1), predictor, predictor.spec).probs
    assert np.array_equal(probs, direct)


def test_bad_files_are_reported_one_line_each_and_the_rest_is_processed(model_file: Path, tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.fromarray(fundus_rgb(2)).save(good)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not a picture")
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(good.read_bytes()[:300])
    jpg = tmp_path / "tr.jpg"
    Image.fromarray(fundus_rgb(3)).save(jpg, quality=95)
    jpg.write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])
    black = tmp_path / "black.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(black)
    missing = tmp_path / "missing.png"
    tiny = tmp_path / "tiny.png"
    Image.fromarray(fundus_rgb(4, size=96)[40:50, 40:50]).save(tiny)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "segment",
                str(good),
                str(empty),
                str(junk),
                str(trunc),
                str(jpg),
                str(black),
                str(missing),
                str(tiny),
                "--model",
                str(model_file),
                "--out",
                str(out),
            ]
        )
    assert exit_info.value.code == 1
    names = sorted(p.name for p in out.iterdir())
    assert names == ["good_mask.png", "good_overlay.png", "good_probs.png", "segment.csv"]  # no temporaries, no halves
    rows = list(csv.DictReader((out / "segment.csv").open()))
    assert [r["file"] for r in rows] == [str(good)]


def test_failure_messages_name_the_file(model_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    trunc = tmp_path / "trunc.png"
    Image.fromarray(fundus_rgb(2)).save(tmp_path / "full.png")
    trunc.write_bytes((tmp_path / "full.png").read_bytes()[:300])
    result = seg.run_segment([empty, trunc], model=model_file, out_dir=tmp_path / "out")
    assert set(result["failed"]) == {str(empty), str(trunc)}
    assert result["failed"][str(empty)] == f"{empty}: file is empty"
    assert result["failed"][str(trunc)].startswith(f"{trunc}: ")
    assert all("\n" not in m for m in result["failed"].values())


def test_fov_folder_is_used_and_must_match(model_file: Path, tmp_path: Path) -> None:
    img = tmp_path / "in" / "01_test.png"
    img.parent.mkdir()
    Image.fromarray(fundus_rgb(4)).save(img)
    fov_dir = tmp_path / "fov"
    fov_dir.mkdir()
    fov = np.zeros((96, 96), np.uint8)
    fov[20:70, 20:70] = 255
    Image.fromarray(fov).save(fov_dir / "01_test_mask.gif")
    result = seg.run_segment([img], model=model_file, out_dir=tmp_path / "out", fov_dir=fov_dir)
    assert result["failed"] == {}
    mask = np.asarray(Image.open(tmp_path / "out" / "01_test_mask.png"))
    assert not mask[fov == 0].any()
    Image.fromarray(fundus_rgb(5)).save(tmp_path / "in" / "02_test.png")
    result = seg.run_segment([tmp_path / "in"], model=model_file, out_dir=tmp_path / "out2", fov_dir=fov_dir)
    assert "no FOV mask" in result["failed"][str(tmp_path / "in" / "02_test.png")]


def test_model_without_spec_gets_one_line_naming_upgrade_model(tmp_path: Path) -> None:
    old = tiny_model_file(tmp_path / "old.pt", spec=False, steps=1)
    with pytest.raises(DataError, match=r"old\.pt: model file has no preprocessing spec.*vesselseg upgrade-model"):
        seg.load_predictor(old)


def test_upgrade_model_adds_the_spec_of_the_params_file(tmp_path: Path) -> None:
    import yaml

    from vesselseg.models import load_model

    old = tiny_model_file(tmp_path / "old.pt", spec=False, steps=1)
    params = {
        "data": {"dataset": "drive"},
        "prepare": {"gamma": 1.2},
        "model": {"depth": 2, "base_channels": 4, "dropout": 0.0},
        "predict": {"threshold": 0.4},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    main(["upgrade-model", str(old), "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "new.pt")])
    _, meta = load_model(tmp_path / "new.pt")
    spec = meta["extra"]["preprocessing"]
    assert spec["gamma"] == 1.2 and spec["threshold"] == 0.4 and spec["fov"]["rule"] == "derive"
    seg.load_predictor(tmp_path / "new.pt")  # usable now


def test_model_reference_resolution_order_and_errors(
    model_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert seg.resolve_model(model_file).kind == "torch"
    with pytest.raises(DataError, match=r"nope\.pt: model file not found"):
        seg.resolve_model(tmp_path / "nope.pt")
    with pytest.raises(DataError, match="not a file, not an MLflow URI .* not a shipped model"):
        seg.resolve_model("something")
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setattr(seg, "_pretrained_path", lambda name: shipped / f"{name}.pt")
    with pytest.raises(DataError, match="pretrained 'fundus' model is not shipped"):
        seg.resolve_model("fundus")
    shutil.copy(model_file, shipped / "fundus.pt")
    ref = seg.resolve_model("fundus")
    assert ref.kind == "torch" and ref.path == shipped / "fundus.pt"
    # a file of that name in the working folder wins over the shipped model
    monkeypatch.chdir(tmp_path)
    shutil.copy(model_file, tmp_path / "fundus")
    assert seg.resolve_model("fundus").path == Path("fundus")


def test_segment_with_a_shipped_name_works_offline(
    model_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(seg, "_pretrained_path", lambda name: model_file)
    Image.fromarray(fundus_rgb(6)).save(tmp_path / "my_photo.jpg")
    main(["segment", str(tmp_path / "my_photo.jpg"), "--model", "fundus", "--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "my_photo_mask.png").is_file()


def test_tta_averages_views_and_is_exact_for_a_symmetric_predictor() -> None:
    image = np.arange(48 * 40, dtype=np.uint8).reshape(48, 40)

    def ident(im: np.ndarray) -> np.ndarray:
        return im.astype(np.float32) / 255

    for mode in ("flips", "d4"):
        assert np.allclose(seg.with_tta(ident, mode)(image), ident(image))
    calls = []
    seg.with_tta(lambda im: calls.append(im.shape) or np.zeros(im.shape[:2], np.float32), "d4")(image)
    assert len(calls) == 8 and (40, 48) in calls


def test_default_tta_is_the_one_the_model_file_names(tmp_path: Path) -> None:
    """A shipped model carries its recipe's TTA (spec["tta"]); segment applies it unless --tta says otherwise."""
    model = tiny_model_file(tmp_path / "flips.pt", spec={**tiny_spec(), "tta": "flips"})
    Image.fromarray(fundus_rgb(5, size=70)).save(tmp_path / "eye.png")
    for mode in ("model", "flips", "none"):
        seg.run_segment([tmp_path / "eye.png"], model=model, out_dir=tmp_path / mode, probs_format="tiff", tta=mode)
    read = {m: tifffile.imread(tmp_path / m / "eye_probs.tif") for m in ("model", "flips", "none")}
    assert np.array_equal(read["model"], read["flips"]) and not np.allclose(read["model"], read["none"])
    bad = tiny_model_file(tmp_path / "bad.pt", spec={**tiny_spec(), "tta": "spin"})
    res = seg.run_segment([tmp_path / "eye.png"], model=bad, out_dir=tmp_path / "never", tta="none")
    assert res["failed"] == {}  # an explicit --tta never reads the spec's
    with pytest.raises(DataError, match="unknown tta 'spin'"):
        seg.run_segment([tmp_path / "eye.png"], model=bad, out_dir=tmp_path / "bad")


def test_fov_diameter_rescales_and_maps_back_to_the_native_size(tmp_path: Path) -> None:
    spec = tiny_spec(fov_diameter=64)
    model = tiny_model_file(tmp_path / "m.pt", spec=spec, steps=5)
    Image.fromarray(fundus_rgb(7, size=128)).save(tmp_path / "big.png")
    result = seg.run_segment([tmp_path / "big.png"], model=model, out_dir=tmp_path / "out")
    assert result["failed"] == {}
    assert np.asarray(Image.open(tmp_path / "out" / "big_probs.png")).shape == (128, 128)


@pytest.mark.shared
def test_drive_test_images_through_segment_with_official_fov(model_file: Path, tmp_path: Path) -> None:
    drive = SHARED / "DRIVE" / "test"
    if not drive.is_dir():
        pytest.skip(f"{drive} absent: DRIVE is not available on this machine")
    images = sorted((drive / "images").glob("*.tif"))[:2]
    result = seg.run_segment(images, model=model_file, out_dir=tmp_path / "out", fov_dir=drive / "mask")
    assert result["failed"] == {}
    probs = np.asarray(Image.open(tmp_path / "out" / f"{images[0].stem}_probs.png"))
    assert probs.shape == (584, 565)


def _card_f1(card: Path) -> float:
    """The DRIVE test F1 a model card states: a line ``DRIVE test F1 (FOV pooled, segment): 0.8312``."""
    import re

    m = re.search(r"DRIVE test F1[^:\n]*:\s*([0-9]*\.[0-9]+)", card.read_text())
    if m is None:
        raise AssertionError(f"{card}: no 'DRIVE test F1 (FOV pooled, segment): <value>' line")
    return float(m.group(1))


def _pooled_f1(out: Path, images: list[Path], drive: Path) -> float:
    tp = fp = fn = 0
    for img in images:
        n = img.stem.split("_")[0]
        pred = np.asarray(Image.open(out / f"{img.stem}_mask.png")) > 0
        label = np.asarray(Image.open(drive / "1st_manual" / f"{n}_manual1.gif")) > 0
        fov = np.asarray(Image.open(drive / "mask" / f"{n}_test_mask.gif")) > 0
        tp += int((pred & label & fov).sum())
        fp += int((pred & ~label & fov).sum())
        fn += int((~pred & label & fov).sum())
    return 2 * tp / (2 * tp + fp + fn)


@pytest.mark.slow
@pytest.mark.shared
def test_shipped_fundus_model_reaches_its_model_card_on_drive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Acceptance of issue 13: the 20 DRIVE test images through segment, the ONNX file and ``models:/...@champion``."""
    drive = SHARED / "DRIVE" / "test"
    shipped = seg._pretrained_path("fundus")
    if not drive.is_dir():
        pytest.skip(f"{drive} absent: DRIVE is not available on this machine")
    if not shipped.is_file():
        pytest.skip(f"{shipped} absent: `dvc pull {shipped}.dvc` (a DVC-tracked output, not a git file)")
    images = sorted((drive / "images").glob("*_test.tif"))
    assert len(images) == 20
    expected = _card_f1(shipped.with_suffix(".md"))
    seg.run_segment(images, model="fundus", out_dir=tmp_path / "pt", fov_dir=drive / "mask", backend="torch")
    assert abs(_pooled_f1(tmp_path / "pt", images, drive) - expected) <= 0.005
    from vesselseg.export import export_model

    onnx_file = export_model("fundus", "onnx", tmp_path / "fundus.onnx")
    seg.run_segment(images, model=onnx_file, out_dir=tmp_path / "onnx", fov_dir=drive / "mask")
    assert abs(_pooled_f1(tmp_path / "onnx", images, drive) - expected) <= 0.005
    # the shipped file logged as an MLflow pyfunc model, registered, aliased @champion
    from mlflow.tracking import MlflowClient

    from vesselseg.mlflow_model import log_vesselseg_model

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run_id = client.create_run(client.create_experiment("shipped", artifact_location=str(tmp_path / "art"))).info.run_id
    source = log_vesselseg_model(shipped, run_id=run_id, uri=uri)
    client.set_terminated(run_id)
    client.create_registered_model("vs-fundus")
    version = client.create_model_version("vs-fundus", source, run_id=run_id)
    client.set_registered_model_alias("vs-fundus", "champion", version.version)
    seg.run_segment(images, model="models:/vs-fundus@champion", out_dir=tmp_path / "mlflow", fov_dir=drive / "mask")
    assert abs(_pooled_f1(tmp_path / "mlflow", images, drive) - expected) <= 0.005


def test_segment_asks_the_family_registry(tmp_path: Path) -> None:
    """A ResNet patch model segments through its own family predictor; an IPN (volumes) is refused in one line."""
    import torch

    from vesselseg.models import build_model, save_model

    spec = tiny_spec()
    torch.manual_seed(0)
    config = {"name": "resnet_patch", "in_channels": 1, "width": 4}
    save_model(tmp_path / "rp.pt", build_model(config), config, extra={"preprocessing": spec, "patch_size": 16})
    predictor = seg.load_predictor(tmp_path / "rp.pt", device="cpu", backend="auto")
    image = line_scene(0, size=40)[0]
    probs = predictor(image)
    assert probs.shape == (40, 40) and probs.dtype == np.float32 and probs.min() >= 0.0 and probs.max() <= 1.0
    config = {"name": "ipn", "in_channels": 1, "out_channels": 1, "channels": 2, "n_blocks": 1, "depth": 4}
    save_model(tmp_path / "ipn.pt", build_model(config), config, extra={"preprocessing": spec})
    with pytest.raises(DataError, match="cannot segment single images"):
        seg.load_predictor(tmp_path / "ipn.pt", device="cpu", backend="torch")(image)
