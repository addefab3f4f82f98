"""Atomic writes: a temporary file beside the target, fsync, then ``os.replace``.

A stage killed at any moment leaves either the previous file or none, never a
truncated one that DVC would cache.  Temporary names are ``.tmp-<pid>-<name>-...``
(and ``.old-<pid>-<name>`` for a folder being swapped out): hidden, never mistaken for
outputs, and carrying the writer's process id so that the next write into the same
folder removes the leftovers of a killed process (whose pid is gone) without
touching those of a live one.  This matters because a leftover inside a DVC output
folder (``data/predictions/.tmp-...``) would otherwise be cached with it.  The pid
test assumes writers share one machine (pid namespace), as DVC stages do.

A full disk (``ENOSPC``/``EDQUOT``) while writing is turned into one
:class:`DiskFullError` naming the file; the temporary file is removed and the
previous output is left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from vesselseg.errors import DataError

log = logging.getLogger(__name__)

_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# .tmp-<pid>-... / .old-<pid>-...: the names this module gives its temporaries.
_TEMP_NAME = re.compile(r"^\.(tmp|old)-(\d+)-")
_swept: set[Path] = set()


class DiskFullError(DataError):
    """No space left while writing an output.

    A :class:`DataError` (hence a one-line CLI error) because the user fixes it, by
    freeing space or pointing the output elsewhere; nothing partial is left behind.
    """


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's live process (or we cannot tell): keep its files
    return True


def sweep_stale(folder: Path | str) -> list[Path]:
    """Remove temporaries left in ``folder`` by writers that no longer run.

    Only names this module makes are touched (``.tmp-<pid>-*``, ``.old-<pid>-*``) and
    only when that pid is dead.  Each folder is swept once per process: a folder
    this process created cannot hold older leftovers, and writing many files into one
    folder should not list it many times.  Returns what was removed.
    """
    folder = Path(folder)
    key = folder.resolve()
    if key in _swept:
        return []
    _swept.add(key)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_NAME.match(entry.name)
        if m is None or _pid_alive(int(m.group(2))):
            continue
        path = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            continue  # another process swept it first
        except OSError as err:
            log.warning("%s: could not remove a killed run's leftover (%s)", path, err.strerror)
            continue
        removed.append(path)
    if removed:
        log.info(
            "%s: removed %d leftover(s) of killed runs: %s",
            folder,
            len(removed),
            ", ".join(p.name for p in removed[:5]),
        )
    return removed


def _disk_full(err: OSError, target: Path) -> DiskFullError:
    where = (
        err.filename if isinstance(err.filename, str) and not Path(err.filename).name.startswith(".tmp-") else target
    )
    return DiskFullError(
        f"{where}: no space left on device while writing it ({err.strerror or err}); "
        "the previous output was left unchanged"
    )


@contextlib.contextmanager
def atomic_path(target: Path | str, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; move it into place on success.

    On any exception the temporary file is removed and ``target`` is untouched.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(target.parent)
        sfx = target.suffix if suffix is None else suffix
        fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{os.getpid()}-{target.stem}-", suffix=sfx, dir=target.parent)
    except OSError as err:
        if err.errno in _NO_SPACE:
            raise _disk_full(err, target) from None
        raise
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(err, OSError) and err.errno in _NO_SPACE:
            raise _disk_full(err, target) from None
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
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(target.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-{target.name}-", dir=target.parent))
    except OSError as err:
        if err.errno in _NO_SPACE:
            raise _disk_full(err, target) from None
        raise
    try:
        yield tmp
    except DiskFullError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        # name the file by where it was going, not by the hidden folder it was built in
        raise DiskFullError(str(err).replace(str(tmp), str(target))) from None
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and err.errno in _NO_SPACE:
            raise DiskFullError(str(_disk_full(err, target)).replace(str(tmp), str(target))) from None
        raise
    old = None
    if target.exists():
        old = target.parent / f".old-{os.getpid()}-{target.name}"
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
