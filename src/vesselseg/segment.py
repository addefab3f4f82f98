"""``vesselseg segment``: any images in, vessel maps out, with no labels and no params.yaml.

What to do to an image comes from the model (its stored preprocessing spec, see
:mod:`vesselseg.preprocess.spec`), never from the user's config, as nnU-Net's
``predict_from_raw_data`` takes its plans from the trained-model folder.  Layers:
:func:`resolve_model` (what M names), :func:`load_predictor` (the one place a model
is called: prepared uint8 image -> probabilities), :func:`segment_image` (one array)
and :func:`run_segment` (files, outputs, failures).

Per image ``<stem>`` the output folder gets ``<stem>_probs.png`` (16-bit, probability
x 65535) or ``<stem>_probs.tif`` (float32), ``<stem>_mask.png`` ({0, 255}: probs >=
the model's threshold, inside the FOV), ``<stem>_overlay.png`` (vessels in red on the
input), and ``segment.csv`` lists file, height, width, vessel density inside the FOV
and seconds per image.  Every file is written atomically, and an image's three files
only after all three were computed, so a failure never leaves half an image's output.
"""

from __future__ import annotations

import atexit
import csv
import gzip
import io as _io
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
from tqdm.auto import tqdm

from vesselseg import atomic, imagefiles
from vesselseg.errors import DataError, ParamsError, VesselsegError
from vesselseg.inference.tta import TTA_MODES
from vesselseg.pretrained import NAMES as PRETRAINED

log = logging.getLogger(__name__)

__all__ = [
    "COMMANDS",
    "ModelRef",
    "Predictor",
    "SegmentResult",
    "load_predictor",
    "read_input_image",
    "resolve_model",
    "run_segment",
    "segment_image",
]

BACKENDS = ("auto", "torch", "onnx")
PROB_FORMATS = ("png16", "tiff")
INPUT_SUFFIXES = (*imagefiles.IMAGE_SUFFIXES, ".ppm.gz", ".pgm.gz")
# smallest image side segment accepts: below it a U-Net's pooling pyramid (and the
# exported models' reflect padding) has nothing left to work on
MIN_SIDE = 32
# window settings when a spec has none (PredictParams' defaults)
DEFAULT_WINDOW = {"size": 1024, "overlap": 0.125, "weighting": "gaussian", "batch_size": 4}


# -- what M names ----------------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    """A resolved model reference: ``kind`` is torch (a vesselseg model file), onnx or torchscript."""

    kind: str
    path: Path
    label: str


def _pretrained_path(name: str) -> Path:
    from vesselseg.pretrained import pretrained_path

    return pretrained_path(name)


def _sniff(path: Path, label: str) -> ModelRef:
    if path.name.lower().endswith(".onnx"):
        return ModelRef("onnx", path, label)
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head[:2] == b"PK":  # torch.save and torch.jit.save both write zip archives
        import zipfile

        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile:
            raise DataError(f"{path}: truncated or damaged model file (bad zip archive)") from None
        if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            return ModelRef("torchscript", path, label)
    return ModelRef("torch", path, label)


def _from_mlflow(uri: str) -> ModelRef:
    """Download an MLflow model (``models:/``, ``runs:/``) and find the vesselseg model file in it."""
    try:
        import mlflow
        from mlflow.exceptions import MlflowException
    except ImportError:
        raise DataError(f"{uri}: MLflow model URIs need mlflow installed") from None
    from vesselseg.paths import default_tracking_uri

    # explicit URIs, not mlflow.set_*_uri: those set process-wide state (and environment
    # variables that child processes inherit), a side effect a library call must not have
    tracking = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    registry = os.environ.get("MLFLOW_REGISTRY_URI") or tracking
    dest = Path(tempfile.mkdtemp(prefix="vesselseg-mlflow-"))
    atexit.register(shutil.rmtree, dest, True)  # the model is read once, at load; the copy goes at exit
    try:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(dest), tracking_uri=tracking, registry_uri=registry
            )
        )
    except MlflowException as err:
        raise DataError(f"{uri}: MLflow model not found ({str(err).splitlines()[0][:200]})") from None
    candidates = [local] if local.is_file() else sorted(local.rglob("*.pt"))
    if not candidates:
        raise DataError(f"{uri}: the MLflow model holds no vesselseg model file (*.pt)")
    return ModelRef("torch", candidates[0], uri)


def resolve_model(ref: str | Path) -> ModelRef:
    """Resolve ``M`` in this order: a file (model, .onnx, TorchScript), an MLflow URI, a shipped name.

    Errors say which of the four forms was tried and why none applied.
    """
    text = str(ref)
    path = Path(text).expanduser()
    if path.is_file():
        return _sniff(path, text)
    if text.startswith(("models:/", "runs:/")):
        return _from_mlflow(text)
    if text in PRETRAINED:
        shipped = _pretrained_path(text)
        if not shipped.is_file():
            # the weights are DVC-tracked outputs (``<name>.pt.dvc``), not git files
            raise DataError(
                f"--model {text}: the pretrained {text!r} model is not shipped with this install (expected "
                f"{shipped}): `dvc pull {shipped}.dvc` from the project's DVC remote, or rebuild it with "
                "`scripts/make_pretrained.py` (its model card has the command)"
            )
        return ModelRef("torch", shipped, text)
    if path.suffix or "/" in text:
        raise DataError(f"{text}: model file not found")
    raise DataError(
        f"--model {text!r}: not a file, not an MLflow URI (models:/NAME@ALIAS, runs:/ID/PATH) and not a "
        f"shipped model ({', '.join(PRETRAINED)})"
    )


def missing_spec_error(path: Path | str) -> DataError:
    return DataError(
        f"{path}: model file has no preprocessing spec (saved before `vesselseg segment` existed); re-save it with "
        f"`vesselseg upgrade-model {path} --params PARAMS_YAML_USED_FOR_TRAINING --out NEW.pt`"
    )


# -- the one place a model is called ----------------------------------------------


@dataclass
class Predictor:
    """Callable: prepared uint8 image (H, W[, C]) -> float32 probabilities (H, W).

    ``spec`` is the model's preprocessing spec, ``backend`` what runs it.
    """

    fn: Callable[[np.ndarray], np.ndarray]
    spec: dict[str, Any]
    backend: str
    source: str

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self.fn(image)


def _window(spec: dict[str, Any]) -> dict[str, Any]:
    return {**DEFAULT_WINDOW, **(spec.get("window") or {})}


def _stitched(run: Callable[[Any], Any], spec: dict[str, Any], device: Any) -> Callable[[np.ndarray], np.ndarray]:
    """Wrap a (B, C, h, w) float tensor -> (B, 1, h, w) probability callable in the stitching."""
    import torch

    from vesselseg.inference.sliding_window import fit_window, sliding_window_inference
    from vesselseg.normalize import image_to_input

    win = _window(spec)

    def predict(image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        window = (h, w) if win["size"] is None else fit_window(win["size"], h, w)
        x = torch.from_numpy(image_to_input(image))[None]
        probs = sliding_window_inference(
            x,
            window=window,
            overlap=win["overlap"],
            predictor=run,
            weighting=win["weighting"],
            batch_size=win["batch_size"],
            device=device,
        )
        out = probs[0, 0].cpu().numpy()
        return np.clip(out, 0.0, 1.0, out=out).astype(np.float32, copy=False)

    return predict


def _onnx_session(data: bytes | str) -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise DataError(
            "--backend onnx needs onnxruntime: pip install onnxruntime (pinned in requirements/constraints.txt)"
        ) from None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])


def _onnx_run(session: Any) -> Callable[[Any], Any]:
    import torch

    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.detach().cpu().numpy().astype(np.float32, copy=False)})[0])

    return run


# Pixel count from which onnxruntime beats torch for a vesselseg model file on the CPU
# (None: never).  benchmarks/bench_onnx.py, 2026-11-30, 2 shared cores (load ~10),
# DRIVE config U-Net: onnxruntime/torch = 0.48 at DRIVE 584x565 and 0.39 at HRF
# 2336x3504, so from any size.  Re-measure and change this one number when the stack
# changes; the benchmark fails when it disagrees with what it measures.
ONNX_WINS_FROM_PIXELS: int | None = 0


def _onnxruntime_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None


def auto_backend(kind: str, shape: tuple[int, int] | None = None, device: str = "cpu") -> str:
    """What ``--backend auto`` runs: an .onnx file in onnxruntime; a model file in
    onnxruntime on the CPU where it measured faster (``shape=None``: for every size),
    else in torch (always on CUDA, and when onnxruntime is not installed)."""
    if kind == "onnx":
        return "onnx"
    if kind != "torch" or device != "cpu" or ONNX_WINS_FROM_PIXELS is None or not _onnxruntime_available():
        return "torch"
    if shape is None:
        return "onnx" if ONNX_WINS_FROM_PIXELS == 0 else "torch"
    return "onnx" if shape[0] * shape[1] >= ONNX_WINS_FROM_PIXELS else "torch"


def load_predictor(model_ref: str | Path | ModelRef, device: str = "auto", backend: str = "auto") -> Predictor:
    """Build the predictor of ``model_ref`` (a file, an MLflow URI or a shipped name).

    ``backend``: ``torch`` runs a vesselseg model file in PyTorch; ``onnx`` runs an
    exported .onnx file, or exports a model file in memory first; ``auto`` is
    :func:`auto_backend` (onnx for an .onnx file; for a model file, onnxruntime only
    where benchmarks/bench_onnx.py measured it faster).  Only the U-Net
    family can be segmented; other families stop with one line.
    """
    import torch

    from vesselseg.device import resolve_device

    if backend not in BACKENDS:
        raise ParamsError(f"--backend: unknown backend {backend!r} (one of {', '.join(BACKENDS)})")
    ref = model_ref if isinstance(model_ref, ModelRef) else resolve_model(model_ref)
    where = str(ref.path)
    if ref.kind == "onnx":
        if backend == "torch":
            raise ParamsError(f"{where}: an ONNX file runs with --backend onnx (or auto), not torch")
        from vesselseg.export import read_onnx_spec

        spec = read_onnx_spec(ref.path)
        if spec is None:
            raise DataError(
                f"{where}: ONNX file has no vesselseg.preprocessing metadata; export it with `vesselseg export`"
            )
        session = _onnx_session(str(ref.path))
        return Predictor(_stitched(_onnx_run(session), spec, torch.device("cpu")), spec, "onnx", ref.label)
    if ref.kind == "torchscript":
        from vesselseg.export import read_torchscript_spec

        module, spec = read_torchscript_spec(ref.path)
        if spec is None:
            raise DataError(
                f"{where}: TorchScript file has no vesselseg.preprocessing extra file; export it with `vesselseg export`"
            )
        dev = resolve_device(device)
        module = module.to(dev).eval()

        def run_ts(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return module(x)

        return Predictor(_stitched(run_ts, spec, dev), spec, "torchscript", ref.label)

    from vesselseg.families import family_of_model_file
    from vesselseg.models import read_model_file
    from vesselseg.params import PredictParams
    from vesselseg.preprocess.spec import check_spec

    meta = read_model_file(ref.path)
    spec = (meta.get("extra") or {}).get("preprocessing")
    if spec is None:
        raise missing_spec_error(ref.path)
    check_spec(spec, where)
    family = family_of_model_file(ref.path)  # the registry decides how this model predicts an image
    exportable = family.info.exportable  # vesselseg.export traces the U-Net only
    if backend == "auto":
        # one backend for the whole run, decided for every size at once (see
        # ONNX_WINS_FROM_PIXELS); the model file is exported to ONNX in memory (~2 s)
        backend = auto_backend(ref.kind, None, resolve_device(device).type) if exportable else "torch"
    if backend == "onnx":
        if not exportable:
            raise ParamsError(f"{where}: --backend onnx runs U-Net models only (this is a {family.name!r} model)")
        from vesselseg.export import onnx_bytes
        from vesselseg.models import load_model

        model, _ = load_model(ref.path, map_location="cpu")
        session = _onnx_session(onnx_bytes(model, dict(meta["config"]), spec, where))
        return Predictor(_stitched(_onnx_run(session), spec, torch.device("cpu")), spec, "onnx", ref.label)
    win = _window(spec)
    # TTA is applied by run_segment around this predictor (with_tta), not by the family
    settings = PredictParams(
        window=win["size"], overlap=win["overlap"], weighting=win["weighting"], batch_size=win["batch_size"], tta="none"
    )
    loaded = family.load_predictor(ref.path, predict=settings, device=device, amp=False)
    if loaded.unit != "img":
        raise DataError(
            f"{where}: a {family.name!r} model predicts from {loaded.unit}s and cannot segment single images"
        )
    return Predictor(loaded.predict_image, spec, "torch", ref.label)


def model_tta(spec: dict[str, Any]) -> str:
    """The TTA a model file asks for (``spec["tta"]``, set for the shipped models from their
    recipe's ``predict.tta``), ``none`` when it names none.

    Why a model may carry it: its card's numbers were measured with it, and a user who
    runs ``--model fundus`` should get those numbers without knowing the recipe (as
    nnU-Net mirrors by default).  ``--tta none|flips|d4`` overrides it.
    """
    mode = str(spec.get("tta", "none"))
    if mode not in TTA_MODES:
        raise DataError(f"model preprocessing spec names an unknown tta {mode!r} (one of {', '.join(TTA_MODES)})")
    return mode


def with_tta(predict: Callable[[np.ndarray], np.ndarray], mode: str) -> Callable[[np.ndarray], np.ndarray]:
    """``predict`` averaged over flips (``flips``) or the 8 dihedral views (``d4``): the pipeline's own TTA."""
    from vesselseg.inference.tta import predict_with_tta

    if mode not in TTA_MODES:
        raise ParamsError(f"--tta: unknown mode {mode!r} (one of model, {', '.join(TTA_MODES)})")
    if mode == "none":
        return predict
    return lambda image: predict_with_tta(predict, image, mode)


# -- one image --------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentResult:
    """One image's outputs at its native size."""

    probs: np.ndarray  # float32 (H, W) in [0, 1], zero outside the FOV
    mask: np.ndarray  # bool (H, W)
    fov: np.ndarray  # bool (H, W)
    density: float  # vessel fraction inside the FOV


def segment_image(
    image: np.ndarray, predict: Callable[[np.ndarray], np.ndarray], spec: dict[str, Any], fov: np.ndarray | None = None
) -> SegmentResult:
    """Preprocess as the model was trained, predict, map back to the native size, threshold."""
    from vesselseg.preprocess.spec import preprocess_image, to_native

    if min(image.shape[:2]) < MIN_SIDE:
        raise DataError(f"image is {image.shape[1]}x{image.shape[0]} px; segment needs at least {MIN_SIDE} px per side")
    prepared = preprocess_image(image, spec, fov=fov)
    want = int(spec.get("in_channels", 1))
    have = 1 if prepared.image.ndim == 2 else int(prepared.image.shape[2])
    if have != want:
        raise DataError(f"image gives {have} channel(s) after preprocessing but the model expects {want}")
    probs = to_native(predict(prepared.image), prepared.native_shape)
    native_fov = prepared.native_fov
    probs = np.where(native_fov, probs, np.float32(0)).astype(np.float32)
    mask = (probs >= float(spec.get("threshold", 0.5))) & native_fov
    density = float(mask[native_fov].mean()) if native_fov.any() else 0.0
    return SegmentResult(probs=probs, mask=mask, fov=np.asarray(native_fov, dtype=bool), density=density)


# -- files ------------------------------------------------------------------------


def _is_input(path: Path) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in INPUT_SUFFIXES)


def collect_inputs(items: Sequence[Path | str]) -> list[Path]:
    """Files as given (any name) and the image files of folders (sorted, not recursive)."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted((f for f in p.iterdir() if f.is_file() and _is_input(f)), key=imagefiles.natural_key)
            if not found:
                raise DataError(f"{p}: folder holds no images ({', '.join(INPUT_SUFFIXES)})")
            out += found
        else:
            out.append(p)  # a missing file fails later, as one of the images
    return out


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz",):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return Path(name).stem


def read_input_image(path: Path) -> np.ndarray:
    """Read any supported image as uint8 grey or RGB; one DataError naming ``path`` otherwise.

    ``.gz`` files (STARE ships ``.ppm.gz``) are decompressed in memory.  Formats PIL
    can fully decode are decoded by it once first, because OpenCV turns a truncated
    JPEG into a half-grey image with only a console warning.
    """
    from PIL import Image

    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    if path.name.lower().endswith(".gz"):
        try:
            data = gzip.decompress(path.read_bytes())
        except (OSError, EOFError) as err:
            raise DataError(f"{path}: truncated or damaged gzip file ({type(err).__name__})") from None
        with tempfile.TemporaryDirectory(prefix="vesselseg-gz-") as tmp:
            inner = Path(tmp) / Path(path.name[:-3]).name
            inner.write_bytes(data)
            try:
                return read_input_image(inner)
            except DataError as err:
                raise DataError(str(err).replace(str(inner), str(path))) from None
    if path.suffix.lower() not in (".tif", ".tiff"):
        try:
            with Image.open(path) as im:
                im.load()
        except Exception as err:
            what = "truncated image" if "truncat" in str(err).lower() else "not a readable image"
            raise DataError(f"{path}: {what} ({type(err).__name__})") from None
    return imagefiles.read_image(path)


def _find_fov(fov_dir: Path, image_path: Path) -> Path:
    stem = _stem(image_path)
    for cand in sorted(fov_dir.iterdir()):
        if cand.is_file() and _is_input(cand) and _stem(cand) in (stem, f"{stem}_mask", f"{stem}_fov"):
            return cand
    raise DataError(f"{image_path}: no FOV mask for it in {fov_dir} (looked for {stem}.*, {stem}_mask.*, {stem}_fov.*)")


def _overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The input in colour with vessels tinted red (60 % red, 40 % the input)."""
    rgb = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image.copy()
    red = np.array([255, 0, 0], dtype=np.float32)
    rgb[mask] = (0.4 * rgb[mask].astype(np.float32) + 0.6 * red).round().astype(np.uint8)
    return rgb


def _encode_png(arr: np.ndarray, path: Path) -> bytes:
    import cv2

    if arr.ndim == 3:
        arr = arr[:, :, ::-1]
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(arr))
    if not ok:
        raise DataError(f"{path}: could not encode PNG for array {arr.shape} {arr.dtype}")
    return buf.tobytes()


def _encode_outputs(
    stem: str, out_dir: Path, image: np.ndarray, result: SegmentResult, probs_format: str
) -> dict[Path, bytes]:
    files: dict[Path, bytes] = {}
    if probs_format == "png16":
        p = out_dir / f"{stem}_probs.png"
        files[p] = _encode_png(np.round(result.probs * 65535.0).astype(np.uint16), p)
    else:
        import tifffile

        p = out_dir / f"{stem}_probs.tif"
        buf = _io.BytesIO()
        tifffile.imwrite(buf, result.probs.astype(np.float32))
        files[p] = buf.getvalue()
    p = out_dir / f"{stem}_mask.png"
    files[p] = _encode_png(result.mask.astype(np.uint8) * 255, p)
    p = out_dir / f"{stem}_overlay.png"
    files[p] = _encode_png(_overlay(image, result.mask), p)
    return files


def _write_all(files: dict[Path, bytes]) -> None:
    """Write an image's files; if one fails, remove those already written (no half output)."""
    written: list[Path] = []
    try:
        for path, data in files.items():
            atomic.write_bytes(path, data)
            written.append(path)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def run_segment(
    inputs: Sequence[Path | str],
    *,
    model: str | Path,
    out_dir: Path | str,
    fov_dir: Path | str | None = None,
    probs_format: str = "png16",
    backend: str = "auto",
    tta: str = "model",
    device: str = "auto",
) -> dict[str, Any]:
    """Segment every image of ``inputs``; returns ``{"ok": [paths], "failed": {path: message}, "csv": path}``.

    A bad image is reported (one line naming it) and skipped; the others are still
    processed.  The caller turns a non-empty ``failed`` into a non-zero exit.
    """
    if probs_format not in PROB_FORMATS:
        raise ParamsError(f"--probs: unknown format {probs_format!r} (one of {', '.join(PROB_FORMATS)})")
    paths = collect_inputs(inputs)
    if not paths:
        raise DataError("no input images given")
    stems: dict[str, Path] = {}
    for p in paths:
        other = stems.setdefault(_stem(p), p)
        if other != p:
            raise DataError(f"{p}: same output name {_stem(p)!r} as {other}; segment them into different --out folders")
    fov_dir = Path(fov_dir) if fov_dir is not None else None
    if fov_dir is not None and not fov_dir.is_dir():
        raise DataError(f"{fov_dir}: --fov folder not found")
    predictor = load_predictor(model, device=device, backend=backend)
    tta = model_tta(predictor.spec) if tta == "model" else tta
    predict = with_tta(predictor, tta)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    log.info(
        "segmenting %d image(s) with %s (%s backend, tta %s)", len(paths), predictor.source, predictor.backend, tta
    )
    bar = tqdm(paths, desc="segment", unit="img", disable=None)
    for path in bar:
        bar.set_postfix_str(path.name)
        try:
            t0 = time.perf_counter()
            image = read_input_image(path)
            fov = (
                imagefiles.read_mask(_find_fov(fov_dir, path), image.shape[:2], "FOV mask")
                if fov_dir is not None
                else None
            )
            try:
                result = segment_image(image, predict, predictor.spec, fov=fov)
            except DataError as err:
                raise DataError(f"{path}: {err}") from None
            seconds = time.perf_counter() - t0
            _write_all(_encode_outputs(_stem(path), out_dir, image, result, probs_format))
        except VesselsegError as err:
            message = str(err)
            log.error("%s", message)
            failed[str(path)] = message
            continue
        rows.append(
            {
                "file": str(path),
                "height": image.shape[0],
                "width": image.shape[1],
                "vessel_density": round(result.density, 6),
                "seconds": round(seconds, 4),
            }
        )
    bar.close()
    csv_path = out_dir / "segment.csv"
    buf = _io.StringIO()
    writer = csv.DictWriter(
        buf, fieldnames=["file", "height", "width", "vessel_density", "seconds"], lineterminator="\n"
    )
    writer.writeheader()
    writer.writerows(rows)
    atomic.write_text(csv_path, buf.getvalue())
    return {"ok": [r["file"] for r in rows], "failed": failed, "csv": csv_path}


# -- upgrade old model files --------------------------------------------------------


def upgrade_model(old: Path | str, params_path: Path | str, out: Path | str, threshold: float | None = None) -> Path:
    """Add ``extra["preprocessing"]`` (from the params the model was trained with) to an old model file."""
    from vesselseg.models import load_model, save_model
    from vesselseg.params import load_params
    from vesselseg.preprocess.spec import preprocessing_spec

    old = Path(old)
    model, meta = load_model(old, map_location="cpu")
    p = load_params(params_path)
    config = dict(meta["config"])
    if config.get("in_channels") != p.model.in_channels or config.get("name") != p.model.name:
        raise ParamsError(
            f"{params_path}: model.name/in_channels ({p.model.name}, {p.model.in_channels}) differ from "
            f"{old}'s ({config.get('name')}, {config.get('in_channels')}); pass the params used to train it"
        )
    extra = dict(meta.get("extra") or {})
    extra["preprocessing"] = preprocessing_spec(
        p.data, p.prepare, p.model, p.predict.threshold if threshold is None else threshold, predict=p.predict
    )
    save_model(out, model, config, extra=extra)
    return Path(out)


# -- commands -----------------------------------------------------------------------

_PathArg = click.Path(path_type=Path)


@click.command("segment")
@click.argument("images", nargs=-1, required=True, type=_PathArg)
@click.option(
    "--model",
    "model_ref",
    required=True,
    help="A model file, an exported .onnx, an MLflow URI (models:/NAME@ALIAS, runs:/...) or fundus/octa.",
)
@click.option("--out", "out_dir", required=True, type=_PathArg, help="Output folder.")
@click.option(
    "--fov",
    "fov_dir",
    type=_PathArg,
    default=None,
    help="Folder of FOV masks (STEM.*, STEM_mask.*); default: derived by the model's FOV rule.",
)
@click.option(
    "--probs",
    "probs_format",
    type=click.Choice(PROB_FORMATS),
    default="png16",
    show_default=True,
    help="Probability maps as 16-bit PNG or float32 TIFF.",
)
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True)
@click.option(
    "--tta",
    type=click.Choice(("model", *TTA_MODES)),
    default="model",
    show_default=True,
    help="Test-time augmentation: mean over flips or the 8 rotations/flips; 'model': what the model file "
    "asks for (the shipped models: their recipe's), else none.",
)
@click.option("--device", type=click.Choice(("auto", "cpu", "cuda")), default="auto", show_default=True)
def segment(
    images: tuple[Path, ...],
    model_ref: str,
    out_dir: Path,
    fov_dir: Path | None,
    probs_format: str,
    backend: str,
    tta: str,
    device: str,
) -> None:
    """Segment IMAGES (files or folders) with a trained model; no labels or params.yaml needed."""
    result = run_segment(
        images,
        model=model_ref,
        out_dir=out_dir,
        fov_dir=fov_dir,
        probs_format=probs_format,
        backend=backend,
        tta=tta,
        device=device,
    )
    click.echo(f"segmented {len(result['ok'])} image(s) into {out_dir} (table: {result['csv']})")
    if result["failed"]:
        # each failure was logged on its own line as it happened; the summary is the
        # CLI's one error line and exit status 1 (click's Exit is swallowed by main())
        failed = list(result["failed"])
        raise DataError(f"{len(failed)} of {len(failed) + len(result['ok'])} image(s) failed: {', '.join(failed)}")


@click.command("export")
@click.option("--model", "model_ref", required=True, help="A model file, an MLflow URI or fundus/octa.")
@click.option("--format", "fmt", type=click.Choice(("onnx", "torchscript")), required=True)
@click.option("--out", type=_PathArg, required=True)
def export(model_ref: str, fmt: str, out: Path) -> None:
    """Export a model to ONNX or TorchScript (dynamic height and width, preprocessing spec inside)."""
    from vesselseg.export import export_model

    click.echo(f"wrote {export_model(model_ref, fmt, out)}")


@click.command("upgrade-model")
@click.argument("old", type=_PathArg)
@click.option(
    "--params", "params_path", type=_PathArg, required=True, help="The params.yaml the model was trained with."
)
@click.option("--out", type=_PathArg, required=True)
@click.option("--threshold", type=float, default=None, help="Probability threshold (default: predict.threshold).")
def upgrade_model_cmd(old: Path, params_path: Path, out: Path, threshold: float | None) -> None:
    """Add the preprocessing spec to a model file saved before `segment` existed."""
    click.echo(f"wrote {upgrade_model(old, params_path, out, threshold)}")


COMMANDS: list[click.Command] = [segment, export, upgrade_model_cmd]
