"""Atomic writes: a temporary file beside the target, fsync, then ``os.replace``.

A stage killed at any moment leaves either the previous file or none, never a
truncated one that DVC would cache.  The temporary name starts with ``.tmp-`` so a
crashed run's leftovers are easy to spot and are never mistaken for outputs.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np


@contextlib.contextmanager
def atomic_path(target: Path | str, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; move it into place on success.

    On any exception the temporary file is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sfx = target.suffix if suffix is None else suffix
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{target.stem}-", suffix=sfx, dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_open(target: Path | str, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    with atomic_path(target) as tmp, open(tmp, mode, **kwargs) as fh:
        yield fh


def write_bytes(target: Path | str, data: bytes) -> None:
    with atomic_open(target, "wb") as fh:
        fh.write(data)


def write_text(target: Path | str, text: str) -> None:
    with atomic_open(target, "w", encoding="utf-8") as fh:
        fh.write(text)


def write_json(target: Path | str, obj: Any) -> None:
    """Sorted keys and a trailing newline: byte-identical output for equal input."""
    write_text(target, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_npy(target: Path | str, array: np.ndarray) -> None:
    with atomic_open(target, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array), allow_pickle=False)


def write_with(target: Path | str, writer: Callable[[Path], None]) -> None:
    """Run ``writer(tmp_path)`` (e.g. ``torch.save``, ``cv2.imwrite``) atomically."""
    with atomic_path(target) as tmp:
        writer(tmp)


def write_buffer(target: Path | str, fill: Callable[[io.BytesIO], None]) -> None:
    buf = io.BytesIO()
    fill(buf)
    write_bytes(target, buf.getvalue())


@contextlib.contextmanager
def atomic_dir(target: Path | str) -> Iterator[Path]:
    """Build a whole output folder under a temporary name, then swap it in.

    The previous folder is only removed after the new one is complete, so a kill
    leaves the old outputs (or, between the two renames, none).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".old-{target.name}-{os.getpid()}"
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_torch(target: Path | str, obj: Any) -> None:
    """``torch.save`` through a buffer, atomically.

    Saving to a path names the zip's inner folder after the (random) temporary file,
    so two identical models would hash differently; a buffer always uses
    ``archive/``, which keeps model files byte-identical across runs (DVC and the
    determinism promise compare hashes).
    """
    import torch

    write_buffer(target, lambda buf: torch.save(obj, buf))
