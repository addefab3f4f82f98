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
        [
            "train",
            "--patches",
            "patches",
            "--prepared",
            "prepared",
            "--model",
            "models/model.pt",
            "--checkpoint",
            "models/checkpoint.pt",
            "--history",
            "reports/train/history.csv",
            "--metrics",
            "reports/train/metrics.json",
        ],
        ["models/model.pt", "reports/train/history.csv", "reports/train/metrics.json"],
    ),
    "predict": (
        ["predict", "--model", "models/model.pt", "--prepared", "prepared", "--out", "predictions"],
        ["predictions"],
    ),
    "evaluate": (
        [
            "evaluate",
            "--prepared",
            "prepared",
            "--predictions",
            "predictions",
            "--metrics",
            "reports/metrics.json",
            "--per-image",
            "reports/per_image.csv",
            "--plots",
            "reports/plots",
            "--overlays",
            "reports/figures/overlays",
        ],
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

UNET = {
    "name": "unet",
    "in_channels": 1,
    "depth": 1,
    "base_channels": 4,
    "batch_norm": True,
    "dropout": 0.0,
    "upsampling": "bilinear",
    "padding": "same",
    "input_norm": False,
    "out_channels": 1,
}


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


def raw_volumes(
    root: Path, n: int = 3, n_bscans: int = 16, depth: int = 12, width: int = 16, ext: str = ".bmp"
) -> None:
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

    run_patches(
        prepared_dir=root / "prepared",
        out_dir=root / "patches",
        size=16,
        per_image=4,
        val_per_image=2,
        sampling="uniform",
        foreground_fraction=0.5,
        augment_copies=0,
        rotate_limit=0.0,
        scale_limit=0.0,
        seed=0,
    )


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
    Case(
        "not-an-image",
        "prepare",
        _chain(FOLDER, _write("raw/images/s0.png", b"this is not a PNG\n")),
        ("raw/images/s0.png", "not a readable image"),
    ),
    Case(
        "label-not-an-image",
        "prepare",
        _chain(FOLDER, _write("raw/labels/s2.png", b"")),
        ("raw/labels/s2.png", "empty"),
    ),
    Case(
        "label-size-differs",
        "prepare",
        _chain(FOLDER, _img("raw/labels/s1.png", np.zeros((20, 32), np.uint8))),
        ("raw/labels/s1.png", "label size 32x20 differs from its image 32x32"),
    ),
    Case("image-nan", "prepare", _chain(FOLDER, _float_tiff_image(float("nan"))), ("raw/images/s1.tif", "NaN or Inf")),
    Case("empty-fov", "prepare", _chain(FOLDER, _empty_fov), ("raw/fov/s1_mask.png", "FOV mask is empty")),
    Case(
        "non-binary-label",
        "prepare",
        _chain(FOLDER, _nonbinary_label),
        warning="s1.png: label is not binary",
        exit_code=0,
    ),
    Case(
        "16-bit-image",
        "prepare",
        _chain(FOLDER, _rm("raw/images/s0.png"), _img("raw/images/s0.png", _scene(0)[0].astype(np.uint16) * 257)),
        warning="s0.png: uint16 image scaled to 8 bits",
        exit_code=0,
    ),
    Case(
        "rgba-image",
        "prepare",
        _chain(
            FOLDER,
            _img("raw/images/s2.png", np.dstack([np.stack([_scene(2)[0]] * 3, -1), np.full((32, 32), 90, np.uint8)])),
        ),
        warning="s2.png: RGBA image, alpha channel dropped",
        exit_code=0,
    ),
    # --- volumes (prepare, OCTA-500 layout) ---
    Case("volume-nan", "prepare", _volume_value(float("nan")), ("raw/OCTA/2/5.tif", "NaN or Inf"), params=SYN),
    Case("volume-inf", "prepare", _volume_value(float("inf")), ("raw/OCTA/2/5.tif", "NaN or Inf"), params=SYN),
    Case(
        "volume-slice-sizes-differ",
        "prepare",
        _chain(VOLUMES, _img("raw/OCTA/3/7.bmp", np.zeros((12, 20), np.uint8))),
        ("raw/OCTA/3/7.bmp", "all slices of a volume must have one size"),
        params=SYN,
    ),
    Case(
        "volume-missing-slice",
        "prepare",
        _chain(VOLUMES, _rm("raw/OCTA/2/9.bmp")),
        ("raw/OCTA/2/9.bmp", "missing B-scan slice"),
        params=SYN,
    ),
    Case(
        "volume-truncated-slice",
        "prepare",
        _chain(VOLUMES, lambda r: (r / "raw/OCTA/1/3.bmp").write_bytes((r / "raw/OCTA/1/3.bmp").read_bytes()[:1100])),
        ("raw/OCTA/1/3.bmp", "truncated BMP"),
        params=SYN,
    ),
    Case(
        "slab-outside-depth",
        "prepare",
        VOLUMES,
        ("prepare.slab", "outside the volume depth 12"),
        params={**SYN, "prepare.slab": [4, 40]},
    ),
    # --- prepared data (patches) ---
    Case(
        "image-smaller-than-patch",
        "patches",
        PREPARED,
        ("prepared/images/tr0.png", "patches.size=64"),
        params={"patches.size": 64},
    ),
    Case(
        "no-split-file",
        "patches",
        _chain(PREPARED, _rm("prepared/split.json")),
        ("prepared/split.json", "run the prepare stage first"),
    ),
    Case("empty-train-split", "patches", _chain(PREPARED, _split(train=[])), ("split.json", "split 'train' is empty")),
    Case(
        "prepared-image-missing",
        "patches",
        _chain(PREPARED, _rm("prepared/images/tr1.png")),
        ("prepared/images/tr1.png", "not found"),
    ),
    # --- model files (predict) ---
    Case(
        "prepared-image-unreadable",
        "predict",
        _chain(MODEL, lambda r: (r / "prepared/images/va0.png").write_bytes(b"not a png")),
        ("prepared/images/va0.png", "not a readable image"),
    ),
    Case(
        "checkpoint-other-architecture",
        "predict",
        _chain(PREPARED, lambda r: model_file(r, UNET, {**UNET, "depth": 2})),
        ("models/model.pt", "weights do not match"),
    ),
    Case(
        "checkpoint-bare-state-dict",
        "predict",
        _chain(PREPARED, _bare_state_dict),
        ("models/model.pt", "not a vesselseg model file"),
    ),
    Case("model-missing", "predict", PREPARED, ("models/model.pt", "model file not found")),
    Case(
        "model-channels-differ",
        "predict",
        _chain(PREPARED, lambda r: model_file(r, {**UNET, "in_channels": 3})),
        ("prepared/images/va0.png", "model expects 3"),
    ),
    # --- predictions (evaluate) ---
    Case(
        "prediction-missing",
        "evaluate",
        _chain(EVAL, _rm("predictions/test/probs/te1.npy")),
        ("predictions/test/probs/te1.npy", "not found"),
    ),
    Case(
        "prediction-nan",
        "evaluate",
        _chain(EVAL, _probs("predictions/test/probs/te0.npy", np.full((48, 48), np.nan, np.float32))),
        ("predictions/test/probs/te0.npy", "NaN"),
    ),
    Case(
        "prediction-shape-differs",
        "evaluate",
        _chain(EVAL, _probs("predictions/val/probs/va0.npy", np.zeros((40, 48), np.float32))),
        ("predictions/val/probs/va0.npy", "differs from its image"),
    ),
    Case(
        "prepared-label-size-differs",
        "evaluate",
        _chain(EVAL, _img("prepared/labels/te1.png", np.zeros((48, 40), np.uint8))),
        ("prepared/labels/te1.png", "differs from its image"),
    ),
    # --- params (validated before any work, whichever stage runs) ---
    Case("unknown-dataset", "download", FOLDER, ("data.dataset", "nosuchset"), params={"data.dataset": "nosuchset"}),
    Case("unknown-loss", "train", PATCHES, ("train.loss", "focal"), params={"train.loss": "focal"}),
    Case("unknown-model", "train", PATCHES, ("model.name", "transformer"), params={"model.name": "transformer"}),
    Case(
        "unknown-weighting",
        "predict",
        MODEL,
        ("predict.weighting", "triangle"),
        params={"predict.weighting": "triangle"},
    ),
    Case("lr-negative", "train", PATCHES, ("train.lr", "greater than 0"), params={"train.lr": -0.001}),
    Case("lr-zero", "train", PATCHES, ("train.lr", "greater than 0"), params={"train.lr": 0}),
    Case(
        "batch-size-zero",
        "train",
        PATCHES,
        ("train.batch_size", "greater than or equal to 1"),
        params={"train.batch_size": 0},
    ),
    Case(
        "predict-batch-negative",
        "predict",
        MODEL,
        ("predict.batch_size", "greater than or equal to 1"),
        params={"predict.batch_size": -4},
    ),
    Case(
        "patch-size-zero",
        "patches",
        PREPARED,
        ("patches.size", "greater than or equal to 8"),
        params={"patches.size": 0},
    ),
    Case("patch-size-negative", "patches", PREPARED, ("patches.size", "-16"), params={"patches.size": -16}),
    Case("overlap-one", "predict", MODEL, ("predict.overlap", "less than 1"), params={"predict.overlap": 1.0}),
    Case(
        "overlap-negative",
        "predict",
        MODEL,
        ("predict.overlap", "greater than or equal to 0"),
        params={"predict.overlap": -0.5},
    ),
    Case(
        "synthetic-slab-outside-depth",
        "download",
        lambda r: None,
        ("data.synthetic", "slab"),
        params={"data.dataset": "synthetic", "data.synthetic.slab": [100, 400]},
    ),
    Case("unknown-key", "train", PATCHES, ("train.lrr", "unknown key"), params={"train.lrr": 0.1}),
    Case(
        "malformed-yaml",
        "prepare",
        FOLDER,
        ("params.yaml", "line 4", "malformed YAML"),
        params_text="data:\n  dataset: folder\n  seed: [1, 2\nprepare: {}\n",
    ),
    Case(
        "params-not-a-mapping",
        "evaluate",
        EVAL,
        ("params.yaml", "top level must be a mapping"),
        params_text="- just\n- a list\n",
    ),
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
    case = Case(
        "all-background", "evaluate", _chain(EVAL, _img("prepared/labels/te0.png", np.zeros((48, 48), np.uint8)))
    )
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


# ================================================================== bring your own data (download)
#
# A project that already holds a good ``data/raw`` is fed a malformed copy of the user's
# dataset through the download stage, for every adapter that copies user files.  Each
# refused case must stop with one line naming the *user's* file (never the ``data/raw``
# copy or a temporary one) and leave the previous ``data/raw`` byte-identical; each
# accepted case must warn naming the user's file, and the prepare stage that follows
# must not warn again about the copy.

SIDE = 32  # every generated image is SIDE x SIDE (the ingestion minimum is 16)


def _disc(h: int = SIDE, w: int = SIDE) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2 <= (0.42 * min(h, w)) ** 2


def _fundus(k: int, h: int = SIDE, w: int = SIDE) -> np.ndarray:
    """A bright disc on black with a dark vessel: RGB uint8 (a FOV can be derived from it)."""
    rng = np.random.default_rng(k)
    img = np.zeros((h, w, 3), np.uint8)
    img[_disc(h, w)] = (170, 80, 40)
    cv2.line(img, (w // 4, h // 4), (3 * w // 4, 3 * h // 4), (110, 30, 15), 2)
    return np.clip(img.astype(int) + rng.integers(-6, 7, img.shape), 0, 255).astype(np.uint8)


def _vessels(h: int = SIDE, w: int = SIDE) -> np.ndarray:
    label = np.zeros((h, w), np.uint8)
    cv2.line(label, (w // 4, h // 4), (3 * w // 4, 3 * h // 4), 255, 2)
    return label


def _encode(suffix: str, arr: np.ndarray) -> bytes:
    """Encode by suffix with OpenCV/tifffile/PIL (not vesselseg), RGB given as RGB."""
    import io as pyio

    from PIL import Image

    suffix = suffix.lower()
    if suffix in (".tif", ".tiff"):
        buf = pyio.BytesIO()
        tifffile.imwrite(buf, arr)
        return buf.getvalue()
    if suffix == ".gif":
        buf = pyio.BytesIO()
        Image.fromarray(arr).save(buf, format="GIF")
        return buf.getvalue()
    if arr.ndim == 2 and suffix == ".ppm":  # OpenCV writes PPM from 3 channels only
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim == 3:
        arr = arr[:, :, [2, 1, 0, 3][: arr.shape[2]]]
    ok, buf = cv2.imencode(suffix, np.ascontiguousarray(arr))
    assert ok, suffix
    return buf.tobytes()


def _put(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``, gzip-compressed when the name ends in .gz (STARE)."""
    import gzip

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)


def _save(path: Path, arr: np.ndarray) -> None:
    inner = path.with_suffix("") if path.suffix == ".gz" else path
    _put(path, _encode(inner.suffix, arr))


def _plain_bytes(path: Path) -> bytes:
    import gzip

    return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _byo_folder(user: Path) -> None:
    for k in range(3):
        _save(user / "mine/images" / f"s{k}.png", _fundus(k))
        _save(user / "mine/labels" / f"s{k}_label.png", _vessels())
        _save(user / "mine/fov" / f"s{k}_fov.png", _disc().astype(np.uint8) * 255)


def _byo_drive(user: Path) -> None:
    from vesselseg.data.retina import DRIVE_NUMBERS, drive_files

    for part, numbers in DRIVE_NUMBERS.items():
        for n in numbers:
            image, label, fov = drive_files(part, f"{n:02d}")
            _save(user / "DRIVE" / image, _fundus(n))
            _save(user / "DRIVE" / label, _vessels())
            _save(user / "DRIVE" / fov, _disc().astype(np.uint8) * 255)


OCTA_2D = {"Training/OCTA500_3M_train": (10301, 10302, 10303), "Validation/OCTA500_3M_val": (10441,)}


def _byo_octa_2d(user: Path) -> None:
    for prefix, ids in OCTA_2D.items():
        for i in ids:
            _save(user / "OCTA-500_3M_2D" / f"{prefix}_images" / f"{i}.bmp", _fundus(i)[:, :, 1])
            _save(user / "OCTA-500_3M_2D" / f"{prefix}_labels" / f"{i}.bmp", _vessels())


def _byo_octa_maps(user: Path) -> None:
    base = user / "OCTA-500" / "OCTA_3mm"
    for i in (10301, 10302, 10441):
        _save(base / "Projection Maps" / "OCTA(ILM_OPL)" / f"{i}.bmp", _fundus(i)[:, :, 1])
        _save(base / "GT_LargeVessel" / f"{i}.bmp", _vessels())


def _byo_kaggle(user: Path) -> None:
    for split, n in (("train", 2), ("test", 1)):
        for k in range(n):
            _save(user / "Data" / split / "image" / f"{k}.png", _fundus(k))
            _save(user / "Data" / split / "mask" / f"{k}.png", _vessels())


LGG_PATIENTS = ("TCGA_CS_4941_19960909", "TCGA_DU_5849_19950405", "TCGA_HT_7602_19951103")


def _byo_lgg(user: Path) -> None:
    for p, patient in enumerate(LGG_PATIENTS):
        for k in (1, 2):
            _save(user / "kaggle_3m" / patient / f"{patient}_{k}.tif", _fundus(10 * p + k))
            _save(user / "kaggle_3m" / patient / f"{patient}_{k}_mask.tif", _vessels())


def _byo_hrf(user: Path) -> None:
    for c in ("h", "dr", "g"):
        for n in range(1, 16):
            _save(user / "HRF/images" / f"{n:02d}_{c}.jpg", _fundus(n))
            _save(user / "HRF/manual1" / f"{n:02d}_{c}.tif", _vessels())
            _save(user / "HRF/mask" / f"{n:02d}_{c}_mask.tif", _disc().astype(np.uint8) * 255)


def _byo_chase(user: Path) -> None:
    for n in range(1, 15):
        for eye in "LR":
            _save(user / "CHASEDB1" / f"Image_{n:02d}{eye}.jpg", _fundus(n))
            _save(user / "CHASEDB1" / f"Image_{n:02d}{eye}_1stHO.png", _vessels())


def _byo_stare(user: Path) -> None:
    from vesselseg.data.retina import STARE_IDS

    for k, i in enumerate(STARE_IDS):
        _save(user / "STARE" / f"{i}.ppm.gz", _fundus(k))
        _save(user / "STARE" / f"{i}.ah.ppm.gz", np.stack([_vessels()] * 3, axis=-1))


@dataclass(frozen=True)
class Byo:
    """A bring-your-own dataset: how to write a good copy, and which of its files the cases break.

    ``image``, ``label`` and ``fov`` are one subject's files (relative to the user's
    folder); ``test_fov`` is the FOV mask of a test image, where the set ships FOV masks;
    ``truncate`` is the file the truncation case cuts (JPEG decoders accept half a
    file, so sets with JPEG images have their label cut instead).
    """

    dataset: str
    build: Callable[[Path], None]
    source: str
    image: str
    label: str
    fov: str | None = None
    test_fov: str | None = None
    truncate: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    accepts: tuple[str, ...] = ("non-binary-label",)


BYO: dict[str, Byo] = {
    "folder": Byo(
        "folder",
        _byo_folder,
        "mine",
        "mine/images/s1.png",
        "mine/labels/s1_label.png",
        "mine/fov/s1_fov.png",
        "mine/fov/s2_fov.png",
        accepts=("16-bit-image", "rgba-image", "non-binary-label"),
        params={"data.folder.images": "images/*", "data.folder.labels": "labels/*", "data.folder.fov": "fov/*"},
    ),
    "drive": Byo(
        "drive",
        _byo_drive,
        "DRIVE",
        "DRIVE/training/images/21_training.tif",
        "DRIVE/training/1st_manual/21_manual1.gif",
        "DRIVE/training/mask/21_training_mask.gif",
        "DRIVE/test/mask/01_test_mask.gif",
        accepts=("16-bit-image", "rgba-image", "non-binary-label"),
    ),
    "octa500-2d": Byo(
        "octa500",
        _byo_octa_2d,
        "OCTA-500_3M_2D",
        "OCTA-500_3M_2D/Training/OCTA500_3M_train_images/10302.bmp",
        "OCTA-500_3M_2D/Training/OCTA500_3M_train_labels/10302.bmp",
    ),
    "octa500-maps": Byo(
        "octa500",
        _byo_octa_maps,
        "OCTA-500",
        "OCTA-500/OCTA_3mm/Projection Maps/OCTA(ILM_OPL)/10302.bmp",
        "OCTA-500/OCTA_3mm/GT_LargeVessel/10302.bmp",
    ),
    "retina_kaggle": Byo(
        "retina_kaggle",
        _byo_kaggle,
        "Data",
        "Data/train/image/1.png",
        "Data/train/mask/1.png",
        accepts=("16-bit-image", "rgba-image", "non-binary-label"),
    ),
    "lgg_mri": Byo(
        "lgg_mri",
        _byo_lgg,
        "kaggle_3m",
        f"kaggle_3m/{LGG_PATIENTS[1]}/{LGG_PATIENTS[1]}_2.tif",
        f"kaggle_3m/{LGG_PATIENTS[1]}/{LGG_PATIENTS[1]}_2_mask.tif",
        accepts=("16-bit-image", "rgba-image", "non-binary-label"),
    ),
    "hrf": Byo(
        "hrf",
        _byo_hrf,
        "HRF",
        "HRF/images/03_dr.jpg",
        "HRF/manual1/03_dr.tif",
        "HRF/mask/03_dr_mask.tif",
        "HRF/mask/10_g_mask.tif",
        truncate="HRF/manual1/03_dr.tif",
    ),
    "chase_db1": Byo(
        "chase_db1",
        _byo_chase,
        "CHASEDB1",
        "CHASEDB1/Image_04R.jpg",
        "CHASEDB1/Image_04R_1stHO.png",
        truncate="CHASEDB1/Image_04R_1stHO.png",
    ),
    "stare": Byo(
        "stare",
        _byo_stare,
        "STARE",
        "STARE/im0044.ppm.gz",
        "STARE/im0044.ah.ppm.gz",
        accepts=("16-bit-image", "non-binary-label"),
    ),
}


def _shrunk(byo: Byo, user: Path) -> None:
    """The 8x8 case: image, label and FOV of one subject, all 8x8 (so only the size is wrong)."""
    _save(user / byo.image, _fundus(1, 8, 8) if byo.dataset != "octa500" else _fundus(1, 8, 8)[:, :, 1])
    _save(user / byo.label, _vessels(8, 8))
    if byo.fov is not None:
        _save(user / byo.fov, _disc(8, 8).astype(np.uint8) * 255)


# case id -> (what it breaks, the file the message must name, words the message must hold)
Breaker = Callable[[Byo, Path], None]
REFUSED: dict[str, tuple[Breaker, Callable[[Byo], str | None], tuple[str, ...]]] = {
    "truncated-file": (
        lambda b, u: _put(u / (b.truncate or b.image), _half(_plain_bytes(u / (b.truncate or b.image)))),
        lambda b: b.truncate or b.image,
        ("not a readable",),
    ),
    "zero-byte-file": (lambda b, u: _put(u / b.image, b""), lambda b: b.image, ("empty", "not a readable")),
    "not-an-image": (lambda b, u: _put(u / b.image, b"this is not an image\n"), lambda b: b.image, ("not a readable",)),
    "label-size-differs": (
        lambda b, u: _save(u / b.label, _vessels(20, SIDE)),
        lambda b: b.label,
        (f"label size {SIDE}x20 differs from its image {SIDE}x{SIDE}",),
    ),
    "8x8-image": (_shrunk, lambda b: b.image, ("image 8x8 is too small",)),
    "empty-fov-in-a-test-image": (
        lambda b, u: _save(u / str(b.test_fov), np.zeros((SIDE, SIDE), np.uint8)),
        lambda b: b.test_fov,
        ("FOV mask is empty",),
    ),
}


def _accept_16bit(b: Byo, u: Path) -> None:
    image = _fundus(1)
    _save(u / b.image, image.astype(np.uint16) * 257)


def _accept_rgba(b: Byo, u: Path) -> None:
    _save(u / b.image, np.dstack([_fundus(1), np.full((SIDE, SIDE), 90, np.uint8)]))


def _accept_soft_label(b: Byo, u: Path) -> None:
    soft = cv2.GaussianBlur(_vessels().astype(np.float32), (5, 5), 1.5).round().astype(np.uint8)
    _save(u / b.label, soft)


ACCEPTED: dict[str, tuple[Breaker, Callable[[Byo], str], str]] = {
    "16-bit-image": (_accept_16bit, lambda b: b.image, "uint16 image scaled to 8 bits"),
    "rgba-image": (_accept_rgba, lambda b: b.image, "RGBA image, alpha channel dropped"),
    "non-binary-label": (_accept_soft_label, lambda b: b.label, "label is not binary"),
}

BYO_REFUSED = [
    pytest.param(name, case, id=f"{name}-{case}")
    for name, byo in BYO.items()
    for case in REFUSED
    if case != "empty-fov-in-a-test-image" or byo.test_fov is not None
]
BYO_ACCEPTED = [pytest.param(name, case, id=f"{name}-{case}") for name, byo in BYO.items() for case in byo.accepts]

_TEMPLATES: dict[str, Path] = {}


def _good_project(name: str, root: Path, factory: pytest.TempPathFactory) -> Path:
    """A working folder holding the user's good copy (``user/``) and the good ``data/raw``
    the download stage made from it; built once per dataset and copied for each case."""
    import shutil

    byo = BYO[name]
    if name not in _TEMPLATES:
        template = factory.mktemp(f"byo-{name}")
        byo.build(template / "user")
        old = Path.cwd()
        os.chdir(template)
        try:
            _byo_params(template, byo)
            code = run_cli(["--params", "params.yaml", "download", "--out", "data/raw"])
        finally:
            os.chdir(old)
        assert code == 0, f"the good copy of {name} was refused"
        _TEMPLATES[name] = template
    shutil.copytree(_TEMPLATES[name], root, dirs_exist_ok=True)
    _byo_params(root, byo)  # data.source points into this case's own folder
    return root


def _byo_params(root: Path, byo: Byo) -> None:
    case = Case(
        byo.dataset,
        "download",
        lambda r: None,
        params={"data.dataset": byo.dataset, "data.source": str(root / "user" / byo.source), **byo.params},
    )
    write_params(root, case)


def _download(capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = run_cli(["--params", "params.yaml", "download", "--out", "data/raw"])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("name", "case"), BYO_REFUSED)
def test_bad_user_file_never_replaces_good_raw_data(
    name: str,
    case: str,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    byo = BYO[name]
    root = _good_project(name, tmp_path / "project", tmp_path_factory)
    monkeypatch.chdir(root)
    breaker, culprit, words = REFUSED[case]
    breaker(byo, root / "user")
    before = snapshot(root)

    code, err = _download(capsys)

    assert code == 1, f"exit {code}, stderr:\n{err}"
    assert "Traceback" not in err
    lines = err.rstrip("\n").splitlines()
    last = lines[-1]
    assert last.startswith("error: "), err
    assert str(root / "user" / str(culprit(byo))) in last, f"the user's file is not named: {last!r}"
    assert "data/raw" not in last and ".tmp-" not in last, f"a copy is named: {last!r}"
    assert any(w in last for w in words), f"none of {words} in {last!r}"
    assert snapshot(root) == before, "the previous data/raw (or the user's copy) changed"


@pytest.mark.parametrize(("name", "case"), BYO_ACCEPTED)
def test_accepted_user_file_warns_naming_it_once(
    name: str,
    case: str,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    byo = BYO[name]
    root = _good_project(name, tmp_path / "project", tmp_path_factory)
    monkeypatch.chdir(root)
    changer, culprit, warning = ACCEPTED[case]
    changer(byo, root / "user")
    (root / "data/raw/vesselseg-dataset.json").unlink()  # so we can see that a new data/raw was swapped in

    code, err = _download(capsys)

    assert code == 0, err
    named = [line for line in err.splitlines() if "WARNING" in line and warning in line]
    assert len(named) == 1, err
    assert str(root / "user" / culprit(byo)) in named[0] and "data/raw" not in named[0], named[0]
    assert json.loads((root / "data/raw/vesselseg-dataset.json").read_text()) == {"dataset": byo.dataset}

    # the prepare stage reads the stored copy, which needs no change: no second warning
    capsys.readouterr()
    assert run_cli(["--params", "params.yaml", "prepare", "--raw", "data/raw", "--out", "data/prepared"]) == 0
    err = capsys.readouterr().err
    assert warning not in err and "data/raw" not in err, err


def test_a_bad_member_of_a_users_archive_is_named_inside_the_archive(
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import zipfile

    root = _good_project("drive", tmp_path / "project", tmp_path_factory)
    monkeypatch.chdir(root)
    bad = root / "user" / BYO["drive"].image
    bad.write_bytes(_half(bad.read_bytes()))
    archive = root / "user" / "DRIVE.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted((root / "user" / "DRIVE").rglob("*")):
            zf.write(f, f.relative_to(root / "user").as_posix())
    write_params(
        root, Case("drive", "download", lambda r: None, params={"data.dataset": "drive", "data.source": str(archive)})
    )
    before = snapshot(root)

    code, err = _download(capsys)

    last = err.rstrip("\n").splitlines()[-1]
    assert code == 1 and last.startswith("error: "), err
    assert f"{archive}:DRIVE/training/images/21_training.tif: not a readable TIFF" in last, last
    assert snapshot(root) == before

    # an archive without the expected layout: the message names the archive, not its scratch copy
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("notes.txt", "no images here")
    code, err = _download(capsys)
    last = err.rstrip("\n").splitlines()[-1]
    assert code == 1 and last.startswith(f"error: {archive}: no folder with training/images/"), last
    assert ".tmp-" not in last, last


def test_every_adapter_that_copies_user_files_is_covered() -> None:
    from vesselseg.data.adapters import adapter_names

    generated = {"synthetic", "synthetic-fundus"}
    assert {b.dataset for b in BYO.values()} == set(adapter_names()) - generated
    for case in REFUSED:
        assert any(c.values[1] == case for c in BYO_REFUSED)
