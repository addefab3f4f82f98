"""Bad inputs, stage by stage: one line naming the file or param, exit 1, nothing touched.

Each case builds a tiny working folder (raw data, a prepared folder, a model file,
predictions: whatever its stage reads), puts dummy "previous outputs" where the stage
writes, snapshots the whole folder (content hash and mtime of every file), runs the
stage in-process through ``vesselseg.cli.main`` exactly as ``stages/<stage>.py`` does,
and checks:

* the exit status is non-zero;
* stderr ends with one ``error: ...`` line holding the case's needles (the file or the
  param, and what is wrong) and no traceback;
* the folder is byte-for-byte and mtime-for-mtime as before: no output created or
  changed, no temporary left behind, no input altered.

Inputs the pipeline accepts on purpose (a 16-bit or RGBA image, a non-binary label,
an all-background test label) are cases too: they must succeed with the documented
warning naming the file (docs/failure-behaviour.md lists each decision).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile
import yaml

from tests.helpers import make_prepared
from vesselseg.cli import main
from vesselseg.errors import VesselsegError
from vesselseg.params import Params, set_dotted

# Every stage's command line, with the output paths the stage declares in dvc.yaml
# (relative to the case's working folder).
STAGES: dict[str, tuple[list[str], list[str]]] = {
    "download": (["download", "--out", "raw"], ["raw"]),
    "prepare": (["prepare", "--raw", "raw", "--out", "prepared"], ["prepared"]),
    "patches": (["patches", "--prepared", "prepared", "--out", "patches"], ["patches"]),
    "train": (
        ["train", "--patches", "patches", "--prepared", "prepared", "--model", "models/model.pt",
         "--checkpoint", "models/checkpoint.pt", "--history", "reports/train/history.csv",
         "--metrics", "reports/train/metrics.json"],
        ["models/model.pt", "reports/train/history.csv", "reports/train/metrics.json"],
    ),
    "predict": (["predict", "--model", "models/model.pt", "--prepared", "prepared", "--out", "predictions"],
                ["predictions"]),
    "evaluate": (
        ["evaluate", "--prepared", "prepared", "--predictions", "predictions", "--metrics", "reports/metrics.json",
         "--per-image", "reports/per_image.csv", "--plots", "reports/plots", "--overlays", "reports/figures/overlays"],
        ["reports/metrics.json", "reports/per_image.csv", "reports/plots", "reports/figures/overlays"],
    ),
}

# Tiny settings so that a case costs milliseconds; each case overrides what it tests.
BASE: dict[str, Any] = {
    "data.dataset": "folder",
    "data.val_fraction": 0.2,
    "data.test_fraction": 0.2,
    "prepare.slab": None,
    "prepare.equalize": "none",
    "patches.size": 16,
    "patches.per_image": 4,
    "patches.val_per_image": 2,
    "model.depth": 1,
    "model.base_channels": 4,
    "train.epochs": 1,
    "train.batch_size": 4,
    "train.device": "cpu",
    "train.threads": 1,
    "predict.window": 16,
    "predict.overlap": 0.25,
    "predict.batch_size": 4,
    "evaluate.n_overlays": 1,
    "evaluate.curve_points": 11,
}

UNET = {"name": "unet", "in_channels": 1, "depth": 1, "base_channels": 4, "batch_norm": True, "dropout": 0.0,
        "upsampling": "bilinear", "padding": "same", "input_norm": False, "out_channels": 1}


# ------------------------------------------------------------------ input builders


def _png(path: Path, arr: np.ndarray) -> None:
    """Write with OpenCV directly (not vesselseg.imagefiles), so the inputs do not depend on the code under test."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = arr[:, :, ::-1]
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, [2, 1, 0, 3]]
    ok, buf = cv2.imencode(path.suffix, np.ascontiguousarray(arr))
    assert ok
    buf.tofile(str(path))


def _scene(k: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(k)
    label = np.zeros((size, size), dtype=np.uint8)
    label[:, 8 + k : 11 + k] = 255
    label[10 + k, :] = 255
    image = np.clip(60 + (label > 0) * 120 + rng.normal(0, 10, (size, size)), 0, 255).astype(np.uint8)
    return image, label


def raw_folder(root: Path, n: int = 3, size: int = 32) -> None:
    """``data.dataset: folder`` as the download stage leaves it: raw/images, raw/labels, marker."""
    for k in range(n):
        image, label = _scene(k, size)
        _png(root / "raw" / "images" / f"s{k}.png", np.stack([image] * 3, axis=-1))
        _png(root / "raw" / "labels" / f"s{k}.png", label)
    (root / "raw" / "vesselseg-dataset.json").write_text(json.dumps({"dataset": "folder"}))


def raw_volumes(root: Path, n: int = 3, n_bscans: int = 16, depth: int = 12, width: int = 16, ext: str = ".bmp") -> None:
    """``data.dataset: synthetic`` layout: OCTA/<s>/<k>.bmp B-scans (depth, width), GT/<s>.bmp (width, n_bscans)."""
    rng = np.random.default_rng(7)
    for s in range(n):
        folder = root / "raw" / "OCTA" / f"{s + 1}"
        folder.mkdir(parents=True)
        for k in range(1, n_bscans + 1):
            bscan = rng.integers(0, 255, (depth, width), dtype=np.uint8)
            if ext == ".bmp":
                _png(folder / f"{k}.bmp", bscan)
            else:
                tifffile.imwrite(folder / f"{k}{ext}", bscan.astype(np.float32))
        label = np.zeros((width, n_bscans), dtype=np.uint8)
        label[4:6, :] = 255
        _png(root / "raw" / "GT" / f"{s + 1}.bmp", label)
    (root / "raw" / "vesselseg-dataset.json").write_text(json.dumps({"dataset": "synthetic"}))


def prepared(root: Path) -> None:
    make_prepared(root / "prepared", n_train=2, n_val=1, n_test=2)


def predictions(root: Path) -> None:
    """Plausible probabilities for every val/test image of ``prepared``: label-shaped, noisy."""
    split = json.loads((root / "prepared" / "split.json").read_text())
    rng = np.random.default_rng(3)
    for name in ("val", "test"):
        for id_ in split[name]:
            label = cv2.imread(str(root / "prepared" / "labels" / f"{id_}.png"), cv2.IMREAD_GRAYSCALE) > 0
            probs = np.clip(0.8 * label + rng.uniform(0, 0.3, label.shape), 0, 1).astype(np.float32)
            out = root / "predictions" / name / "probs" / f"{id_}.npy"
            out.parent.mkdir(parents=True, exist_ok=True)
            np.save(out, probs)


def model_file(root: Path, config: dict[str, Any] | None = None, weights_of: dict[str, Any] | None = None) -> None:
    """A model file whose stored config is ``config`` and whose weights come from ``weights_of``."""
    import torch

    from vesselseg.models import build_model, save_model

    torch.manual_seed(0)
    config = config or UNET
    net = build_model(weights_of or config)
    save_model(root / "models" / "model.pt", net, config)


def patches_dir(root: Path) -> None:
    from vesselseg.patches import run_patches

    run_patches(prepared_dir=root / "prepared", out_dir=root / "patches", size=16, per_image=4, val_per_image=2,
                sampling="uniform", foreground_fraction=0.5, augment_copies=0, rotate_limit=0.0, scale_limit=0.0, seed=0)


# Small edits on top of the builders ("break exactly one thing").


def _rm(rel: str) -> Callable[[Path], None]:
    return lambda root: (root / rel).unlink()


def _write(rel: str, data: bytes) -> Callable[[Path], None]:
    return lambda root: (root / rel).write_bytes(data)


def _img(rel: str, arr: np.ndarray) -> Callable[[Path], None]:
    return lambda root: _png(root / rel, arr)


def _chain(*steps: Callable[[Path], None]) -> Callable[[Path], None]:
    def run(root: Path) -> None:
        for step in steps:
            step(root)

    return run


def _truncated_tiff(root: Path) -> None:
    (root / "raw/images/s1.png").unlink()
    image, _ = _scene(1)
    path = root / "raw/images/s1.tif"
    tifffile.imwrite(path, np.stack([image] * 3, axis=-1))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _float_tiff_image(value: float) -> Callable[[Path], None]:
    def run(root: Path) -> None:
        (root / "raw/images/s1.png").unlink()
        image = _scene(1)[0].astype(np.float32)
        image[3, 4] = value
        tifffile.imwrite(root / "raw/images/s1.tif", image)

    return run


def _volume_value(value: float) -> Callable[[Path], None]:
    def run(root: Path) -> None:
        raw_volumes(root, ext=".tif")
        path = root / "raw/OCTA/2/5.tif"
        arr = tifffile.imread(path)
        arr[2, 3] = value
        tifffile.imwrite(path, arr)

    return run


def _empty_folder(root: Path) -> None:
    for sub in ("images", "labels"):
        for f in (root / "raw" / sub).iterdir():
            f.unlink()


def _empty_fov(root: Path) -> None:
    for k in range(3):
        _png(root / f"raw/fov/s{k}_mask.png", np.full((32, 32), 255 if k != 1 else 0, dtype=np.uint8))


def _split(**lists: list[str]) -> Callable[[Path], None]:
    def run(root: Path) -> None:
        path = root / "prepared/split.json"
        meta = json.loads(path.read_text())
        meta.update(lists)
        path.write_text(json.dumps(meta))

    return run


def _bare_state_dict(root: Path) -> None:
    import torch

    from vesselseg.models import build_model

    (root / "models").mkdir(exist_ok=True)
    torch.save(build_model(UNET).state_dict(), root / "models/model.pt")


def _probs(rel: str, arr: np.ndarray) -> Callable[[Path], None]:
    return lambda root: np.save(root / rel, arr)


def _nonbinary_label(root: Path) -> None:
    _, label = _scene(1)
    label = label.astype(np.float32)
    label = cv2.GaussianBlur(label, (5, 5), 1.5).round().astype(np.uint8)  # interpolated edges
    _png(root / "raw/labels/s1.png", label)


# ------------------------------------------------------------------ the table


@dataclass(frozen=True)
class Case:
    id: str
    stage: str
    build: Callable[[Path], None]
    needles: tuple[str, ...] = ()  # all must appear in the one error line
    params: dict[str, Any] = field(default_factory=dict)
    params_text: str | None = None  # a params file written verbatim (malformed ones)
    warning: str | None = None  # set for inputs that are accepted with a warning
    exit_code: int = 1


FOLDER = raw_folder
VOLUMES = raw_volumes
PREPARED = prepared
PATCHES = _chain(prepared, patches_dir)
MODEL = _chain(prepared, model_file)
EVAL = _chain(prepared, predictions)
SYN = {"data.dataset": "synthetic"}

CASES: list[Case] = [
    # --- raw images and labels (prepare) ---
    Case("missing-image", "prepare", _chain(FOLDER, _rm("raw/images/s1.png")), ("label s1.png", "unpaired")),
    Case("missing-label", "prepare", _chain(FOLDER, _rm("raw/labels/s2.png")), ("image s2.png", "unpaired")),
    Case("empty-dataset", "prepare", _chain(FOLDER, _empty_folder), ("raw", "no images found")),
    Case("truncated-tiff", "prepare", _chain(FOLDER, _truncated_tiff), ("raw/images/s1.tif", "not a readable TIFF")),
    Case("not-an-image", "prepare", _chain(FOLDER, _write("raw/images/s0.png", b"this is not a PNG\n")),
         ("raw/images/s0.png", "not a readable image")),
    Case("label-not-an-image", "prepare", _chain(FOLDER, _write("raw/labels/s2.png", b"")),
         ("raw/labels/s2.png", "empty")),
    Case("label-size-differs", "prepare", _chain(FOLDER, _img("raw/labels/s1.png", np.zeros((20, 32), np.uint8))),
         ("raw/labels/s1.png", "label size 32x20 differs from its image 32x32")),
    Case("image-nan", "prepare", _chain(FOLDER, _float_tiff_image(float("nan"))), ("raw/images/s1.tif", "NaN or Inf")),
    Case("empty-fov", "prepare", _chain(FOLDER, _empty_fov), ("raw/fov/s1_mask.png", "FOV mask is empty")),
    Case("non-binary-label", "prepare", _chain(FOLDER, _nonbinary_label), warning="s1.png: label is not binary",
         exit_code=0),
    Case("16-bit-image", "prepare",
         _chain(FOLDER, _rm("raw/images/s0.png"), _img("raw/images/s0.png", _scene(0)[0].astype(np.uint16) * 257)),
         warning="s0.png: uint16 image scaled to 8 bits", exit_code=0),
    Case("rgba-image", "prepare",
         _chain(FOLDER, _img("raw/images/s2.png", np.dstack([np.stack([_scene(2)[0]] * 3, -1), np.full((32, 32), 90, np.uint8)]))),
         warning="s2.png: RGBA image, alpha channel dropped", exit_code=0),
    # --- volumes (prepare, OCTA-500 layout) ---
    Case("volume-nan", "prepare", _volume_value(float("nan")), ("raw/OCTA/2/5.tif", "NaN or Inf"), params=SYN),
    Case("volume-inf", "prepare", _volume_value(float("inf")), ("raw/OCTA/2/5.tif", "NaN or Inf"), params=SYN),
    Case("volume-slice-sizes-differ", "prepare",
         _chain(VOLUMES, _img("raw/OCTA/3/7.bmp", np.zeros((12, 20), np.uint8))),
         ("raw/OCTA/3/7.bmp", "all slices of a volume must have one size"), params=SYN),
    Case("volume-missing-slice", "prepare", _chain(VOLUMES, _rm("raw/OCTA/2/9.bmp")),
         ("raw/OCTA/2/9.bmp", "missing B-scan slice"), params=SYN),
    Case("volume-truncated-slice", "prepare",
         _chain(VOLUMES, lambda r: (r / "raw/OCTA/1/3.bmp").write_bytes((r / "raw/OCTA/1/3.bmp").read_bytes()[:1100])),
         ("raw/OCTA/1/3.bmp", "truncated BMP"), params=SYN),
    Case("slab-outside-depth", "prepare", VOLUMES, ("prepare.slab", "outside the volume depth 12"),
         params={**SYN, "prepare.slab": [4, 40]}),
    # --- prepared data (patches) ---
    Case("image-smaller-than-patch", "patches", PREPARED, ("prepared/images/tr0.png", "patches.size=64"),
         params={"patches.size": 64}),
    Case("no-split-file", "patches", _chain(PREPARED, _rm("prepared/split.json")),
         ("prepared/split.json", "run the prepare stage first")),
    Case("empty-train-split", "patches", _chain(PREPARED, _split(train=[])), ("split.json", "split 'train' is empty")),
    Case("prepared-image-missing", "patches", _chain(PREPARED, _rm("prepared/images/tr1.png")),
         ("prepared/images/tr1.png", "not found")),
    # --- model files (predict) ---
    Case("prepared-image-unreadable", "predict",
         _chain(MODEL, lambda r: (r / "prepared/images/va0.png").write_bytes(b"not a png")),
         ("prepared/images/va0.png", "not a readable image")),
    Case("checkpoint-other-architecture", "predict",
         _chain(PREPARED, lambda r: model_file(r, UNET, {**UNET, "depth": 2})),
         ("models/model.pt", "weights do not match")),
    Case("checkpoint-bare-state-dict", "predict", _chain(PREPARED, _bare_state_dict),
         ("models/model.pt", "not a vesselseg model file")),
    Case("model-missing", "predict", PREPARED, ("models/model.pt", "model file not found")),
    Case("model-channels-differ", "predict", _chain(PREPARED, lambda r: model_file(r, {**UNET, "in_channels": 3})),
         ("prepared/images/va0.png", "model expects 3")),
    # --- predictions (evaluate) ---
    Case("prediction-missing", "evaluate", _chain(EVAL, _rm("predictions/test/probs/te1.npy")),
         ("predictions/test/probs/te1.npy", "not found")),
    Case("prediction-nan", "evaluate",
         _chain(EVAL, _probs("predictions/test/probs/te0.npy", np.full((48, 48), np.nan, np.float32))),
         ("predictions/test/probs/te0.npy", "NaN")),
    Case("prediction-shape-differs", "evaluate",
         _chain(EVAL, _probs("predictions/val/probs/va0.npy", np.zeros((40, 48), np.float32))),
         ("predictions/val/probs/va0.npy", "differs from its image")),
    Case("prepared-label-size-differs", "evaluate",
         _chain(EVAL, _img("prepared/labels/te1.png", np.zeros((48, 40), np.uint8))),
         ("prepared/labels/te1.png", "differs from its image")),
    # --- params (validated before any work, whichever stage runs) ---
    Case("unknown-dataset", "download", FOLDER, ("data.dataset", "nosuchset"), params={"data.dataset": "nosuchset"}),
    Case("unknown-loss", "train", PATCHES, ("train.loss", "focal"), params={"train.loss": "focal"}),
    Case("unknown-model", "train", PATCHES, ("model.name", "transformer"), params={"model.name": "transformer"}),
    Case("unknown-weighting", "predict", MODEL, ("predict.weighting", "triangle"), params={"predict.weighting": "triangle"}),
    Case("lr-negative", "train", PATCHES, ("train.lr", "greater than 0"), params={"train.lr": -0.001}),
    Case("lr-zero", "train", PATCHES, ("train.lr", "greater than 0"), params={"train.lr": 0}),
    Case("batch-size-zero", "train", PATCHES, ("train.batch_size", "greater than or equal to 1"),
         params={"train.batch_size": 0}),
    Case("predict-batch-negative", "predict", MODEL, ("predict.batch_size", "greater than or equal to 1"),
         params={"predict.batch_size": -4}),
    Case("patch-size-zero", "patches", PREPARED, ("patches.size", "greater than or equal to 8"), params={"patches.size": 0}),
    Case("patch-size-negative", "patches", PREPARED, ("patches.size", "-16"), params={"patches.size": -16}),
    Case("overlap-one", "predict", MODEL, ("predict.overlap", "less than 1"), params={"predict.overlap": 1.0}),
    Case("overlap-negative", "predict", MODEL, ("predict.overlap", "greater than or equal to 0"),
         params={"predict.overlap": -0.5}),
    Case("synthetic-slab-outside-depth", "download", lambda r: None, ("data.synthetic", "slab"),
         params={"data.dataset": "synthetic", "data.synthetic.slab": [100, 400]}),
    Case("unknown-key", "train", PATCHES, ("train.lrr", "unknown key"), params={"train.lrr": 0.1}),
    Case("malformed-yaml", "prepare", FOLDER, ("params.yaml", "line 4", "malformed YAML"),
         params_text="data:\n  dataset: folder\n  seed: [1, 2\nprepare: {}\n"),
    Case("params-not-a-mapping", "evaluate", EVAL, ("params.yaml", "top level must be a mapping"),
         params_text="- just\n- a list\n"),
]


# ------------------------------------------------------------------ running a case


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file and folder under ``root``: content hash and mtime in ns of each file.

    A folder's own mtime is left out: building a temporary folder inside it and
    removing it again changes that, while no output changed.
    """
    out: dict[str, tuple[str, int]] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_dir():
            out[rel] = ("<dir>", 0)
        else:
            out[rel] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    return out


def previous_outputs(root: Path, stage: str) -> None:
    """Stand-ins for a previous run's outputs, which a failed stage must leave as they are."""
    for rel in STAGES[stage][1]:
        path = root / rel
        if path.suffix:  # a file output
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("previous run\n")
        else:
            path.mkdir(parents=True, exist_ok=True)
            (path / "previous.txt").write_text("previous run\n")


def write_params(root: Path, case: Case) -> Path:
    path = root / "params.yaml"
    if case.params_text is not None:
        path.write_text(case.params_text)
        return path
    tree = Params().model_dump(mode="json")
    for key, value in {**BASE, **case.params}.items():
        set_dotted(tree, key, value)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def run_cli(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as stop:
        return int(stop.code or 0)
    return 0


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VESSELSEG_THREADS", "1")
    monkeypatch.setenv("VESSELSEG_LOG", "WARNING")


def _setup(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.chdir(tmp_path)
    case.build(tmp_path)
    write_params(tmp_path, case)
    argv, _ = STAGES[case.stage]
    return ["--params", "params.yaml", *argv]


@pytest.mark.parametrize("case", [c for c in CASES if c.warning is None], ids=lambda c: c.id)
def test_bad_input_fails_with_one_line_and_touches_nothing(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _setup(case, tmp_path, monkeypatch)
    previous_outputs(tmp_path, case.stage)
    before = snapshot(tmp_path)
    capsys.readouterr()

    code = run_cli(argv)

    err = capsys.readouterr().err
    assert code == case.exit_code, f"exit {code}, stderr:\n{err}"
    assert "Traceback" not in err
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith("error: "), err
    assert err.rstrip("\n").endswith(last) and "\n" not in last
    for needle in case.needles:
        assert needle in last, f"{needle!r} not in {last!r}"
    assert snapshot(tmp_path) == before, "a failed stage created, changed or left files behind"


@pytest.mark.parametrize("case", [c for c in CASES if c.warning is not None], ids=lambda c: c.id)
def test_accepted_input_succeeds_with_a_warning_naming_the_file(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _setup(case, tmp_path, monkeypatch)
    code = run_cli(argv)
    err = capsys.readouterr().err
    assert code == 0, err
    assert case.warning in err and "WARNING" in err
    # the input was used, not skipped: the prepared label/image exists and is binary {0, 255}
    split = json.loads((tmp_path / "prepared/split.json").read_text())
    ids = sorted(i for s in ("train", "val", "test") for i in split[s])
    assert ids == ["s0", "s1", "s2"]
    for i in ids:
        label = cv2.imread(str(tmp_path / "prepared/labels" / f"{i}.png"), cv2.IMREAD_UNCHANGED)
        assert set(np.unique(label)) <= {0, 255}
        image = cv2.imread(str(tmp_path / "prepared/images" / f"{i}.png"), cv2.IMREAD_UNCHANGED)
        assert image.dtype == np.uint8 and image.ndim == 2


def test_non_binary_label_is_thresholded_at_half_its_maximum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    case = next(c for c in CASES if c.id == "non-binary-label")
    assert run_cli(_setup(case, tmp_path, monkeypatch)) == 0
    raw = cv2.imread(str(tmp_path / "raw/labels/s1.png"), cv2.IMREAD_UNCHANGED)
    got = cv2.imread(str(tmp_path / "prepared/labels/s1.png"), cv2.IMREAD_UNCHANGED) > 0
    np.testing.assert_array_equal(got, raw > raw.max() / 2)


def test_16_bit_image_keeps_its_relative_contrast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    case = next(c for c in CASES if c.id == "16-bit-image")
    assert run_cli(_setup(case, tmp_path, monkeypatch)) == 0
    got = cv2.imread(str(tmp_path / "prepared/images/s0.png"), cv2.IMREAD_UNCHANGED)
    # x * 257 scaled by 255 / 65535 is x again (prepare.equalize none, channel green of grey)
    np.testing.assert_array_equal(got, _scene(0)[0])


def test_all_background_test_label_gives_finite_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    case = Case("all-background", "evaluate", _chain(EVAL, _img("prepared/labels/te0.png", np.zeros((48, 48), np.uint8))))
    argv = _setup(case, tmp_path, monkeypatch)
    assert run_cli(argv) == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "reports/metrics.json").read_text())
    for split in ("val", "test"):
        for name, value in metrics[split].items():
            assert isinstance(value, (int, float)) and math.isfinite(value), (split, name, value)
    # the pooled test split still has vessels (te1), so its AUC is defined
    assert "auc_roc" in metrics["test"]
    table = pd.read_csv(tmp_path / "reports/per_image.csv")
    row = table[table["id"] == "te0"].iloc[0]
    # everything but the AUC (undefined for one class: an empty cell) is a number
    finite = row.drop(["split", "id", "auc_roc"]).astype(float)
    assert np.isfinite(finite).all(), row.to_dict()
    assert math.isnan(row["auc_roc"])
    # independent check of the one image: no vessel pixel, so specificity is the share
    # of FOV pixels predicted below the threshold
    probs = np.load(tmp_path / "predictions/test/probs/te0.npy")
    fov = cv2.imread(str(tmp_path / "prepared/fov/te0.png"), cv2.IMREAD_GRAYSCALE) > 0
    assert row["specificity"] == pytest.approx(float((probs[fov] < 0.5).mean()), abs=1e-6)


def test_debug_shows_the_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    case = next(c for c in CASES if c.id == "truncated-tiff")
    argv = _setup(case, tmp_path, monkeypatch)
    with pytest.raises(VesselsegError, match="not a readable TIFF"):
        main(["--debug", *argv])


def test_the_table_is_at_least_30_cases_over_every_stage() -> None:
    assert len(CASES) >= 30
    assert {c.stage for c in CASES} == set(STAGES)
    assert len({c.id for c in CASES}) == len(CASES)


def test_helpers_snapshot_sees_a_change(tmp_path: Path) -> None:
    """The snapshot used above must notice a rewrite with equal content (mtime) and a new file."""
    (tmp_path / "a.txt").write_text("x")
    first = snapshot(tmp_path)
    os.utime(tmp_path / "a.txt", ns=(1, 1))
    assert snapshot(tmp_path) != first
    second = snapshot(tmp_path)
    (tmp_path / ".tmp-1-a").write_text("")
    assert snapshot(tmp_path) != second
