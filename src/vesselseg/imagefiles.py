"""Every file format in one place, with one array convention.

Convention (as nnU-Net's readers pin theirs):
- an *image* is ``uint8`` ``(H, W)`` for grey or ``(H, W, 3)`` RGB (never BGR);
- a *label* or *FOV mask* is ``bool`` ``(H, W)``;
- a *probability map* is ``float32`` ``(H, W)`` in [0, 1];
- a *volume* is ``(n_bscans, depth, width)`` as OCTA-500 stores it: one B-scan per slice.

Readers raise :class:`~vesselseg.errors.DataError` naming the file and what is wrong,
never a bare decoder exception.  Writers are atomic.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import cv2
import numpy as np
import tifffile
from PIL import Image

from vesselseg import atomic
from vesselseg.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff", ".gif", ".ppm", ".pgm")


def _decode(path: Path) -> np.ndarray:
    suffix = path.suffix.lower()
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if suffix in (".tif", ".tiff"):
        try:
            return tifffile.imread(path)
        except Exception as err:  # tifffile raises many types for corrupt files
            raise DataError(f"{path}: not a readable TIFF ({type(err).__name__}: {err})") from None
    if suffix == ".gif":
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("L") if im.mode not in ("L", "RGB") else im)
        except Exception as err:
            raise DataError(f"{path}: not a readable GIF ({type(err).__name__})") from None
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0:
        raise DataError(f"{path}: file is empty")
    arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if arr is None:
        # PIL knows a few formats OpenCV refuses (and the reverse); try it before failing.
        try:
            with Image.open(path) as im:
                return np.asarray(im)
        except Exception:
            raise DataError(f"{path}: not a readable image (unknown format or truncated file)") from None
    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = arr[:, :, ::-1]
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, [2, 1, 0, 3]]
    return arr


def to_uint8(arr: np.ndarray, path: Path | str) -> np.ndarray:
    """Bring 16-bit or float images to uint8, refusing NaN/Inf."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise DataError(f"{path}: image holds NaN or Inf values")
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        return np.clip((arr - lo) * scale, 0, 255).round().astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        hi = int(arr.max()) if arr.size else 0
        if hi <= 255 and arr.min() >= 0:
            return arr.astype(np.uint8)
        # 16-bit data: scale by the full range of the type actually used (not the
        # image's own max, which would change the contrast from image to image).
        top = 65535 if hi <= 65535 else hi
        log.warning("%s: %s image scaled to 8 bits", path, arr.dtype)
        return (arr.astype(np.float64) * (255.0 / top)).round().astype(np.uint8)
    raise DataError(f"{path}: unsupported pixel type {arr.dtype}")


def image_size(path: Path | str) -> tuple[int, int]:
    """(H, W) from the file header only: every input of a run is checked before any pixel is decoded."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            width, height = im.size
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as err:
        raise DataError(f"{path}: not a readable image ({type(err).__name__})") from None
    return height, width


def read_image(path: Path | str) -> np.ndarray:
    """Read an image as uint8 (H, W) or (H, W, 3); RGBA loses alpha with a warning."""
    path = Path(path)
    arr = _decode(path)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 3 and arr.shape[2] == 4:
        log.warning("%s: RGBA image, alpha channel dropped", path)
        arr = arr[:, :, :3]
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[2] not in (3, 4):
        arr = np.moveaxis(arr[:3], 0, -1)  # channel-first TIFF
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise DataError(f"{path}: expected a 2D grey or RGB image, got shape {arr.shape}")
    if min(arr.shape[:2]) < 1:
        raise DataError(f"{path}: image is empty (shape {arr.shape})")
    return np.ascontiguousarray(to_uint8(arr, path))


def read_mask(path: Path | str, shape: tuple[int, int] | None = None, what: str = "label") -> np.ndarray:
    """Read a binary label or FOV mask as bool.

    Policy for non-binary labels: values are thresholded at half the maximum with a
    warning (interpolated masks, e.g. resized Kaggle sets, are common and recoverable);
    a label with only one non-zero grey level is taken as is.
    """
    path = Path(path)
    arr = _decode(path)
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=2) if arr.shape[2] in (3, 4) else arr[..., 0]
    if arr.ndim != 2:
        raise DataError(f"{path}: {what} must be a 2D mask, got shape {arr.shape}")
    if shape is not None and tuple(arr.shape) != tuple(shape):
        raise DataError(
            f"{path}: {what} size {arr.shape[1]}x{arr.shape[0]} differs from its image {shape[1]}x{shape[0]}"
        )
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise DataError(f"{path}: {what} holds NaN or Inf values")
    values = np.unique(arr)
    if values.size > 2:
        log.warning("%s: %s is not binary (%d grey levels); thresholded at half its maximum", path, what, values.size)
    top = float(values.max()) if values.size else 0.0
    return arr > (top / 2.0) if top > 0 else np.zeros(arr.shape, dtype=bool)


def write_png(path: Path | str, arr: np.ndarray) -> None:
    """Write uint8/uint16/bool as PNG, atomically; RGB is given as RGB."""
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 3:
        arr = arr[:, :, ::-1]
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(arr))
    if not ok:
        raise DataError(f"{path}: could not encode PNG for array {arr.shape} {arr.dtype}")
    atomic.write_bytes(path, buf.tobytes())


def natural_key(path: Path | str) -> list[object]:
    """Sort ``2.bmp`` before ``10.bmp`` (OCTA-500 numbers its B-scans this way)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", Path(path).name)]


def list_slices(folder: Path | str) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: volume folder not found")
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=natural_key)
    if not files:
        raise DataError(f"{folder}: volume folder holds no B-scan images")
    _check_numbering(folder, files)
    return files


def _check_numbering(folder: Path, files: list[Path]) -> None:
    """Refuse a gap or a duplicate in numbered B-scans (``1.bmp .. N.bmp``).

    A missing slice would otherwise shift every later B-scan one column left in the
    en-face map, misaligning it with its label without any error.  Numbering starts at
    1 (OCTA-500) or 0; folders whose names are not plain numbers are not checked.
    """
    if not all(p.stem.isdigit() for p in files):
        return
    numbers = [int(p.stem) for p in files]
    seen: dict[int, Path] = {}
    for n, p in zip(numbers, files, strict=True):
        if n in seen:
            raise DataError(f"{p}: B-scan number {n} appears twice (also {seen[n].name})")
        seen[n] = p
    first = 0 if numbers[0] == 0 else 1
    missing = sorted(set(range(first, numbers[-1] + 1)) - set(numbers))
    if missing:
        suffix = files[0].suffix
        shown = ", ".join(f"{m}{suffix}" for m in missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise DataError(
            f"{folder / f'{missing[0]}{suffix}'}: missing B-scan slice ({len(missing)} missing: {shown}); "
            f"the volume has {len(files)} slices numbered up to {numbers[-1]}"
        )
