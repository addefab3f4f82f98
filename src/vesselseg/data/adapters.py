"""The registry of dataset adapters: the one seam between the pipeline and a dataset.

An adapter does two things.  ``materialize`` (download stage) fills ``data/raw/<name>``
from the network, a generator or the user's own copy, building the folder under a
temporary name and swapping it in (:func:`vesselseg.atomic.atomic_dir`), and never
writing into the user's source.  ``samples`` (prepare stage) lists what is there as
:class:`~vesselseg.data.sample.RawSample` records.  Adapter modules are imported on
first use, so importing the registry costs nothing and cannot fail on one dataset's
dependencies.

Every adapter that takes a user's files hands them to :func:`vesselseg.data.ingest.ingest`,
which checks each file while the previous ``data/raw`` is still in place and names the
user's file (or ``<archive>:<member>``) in every message.

The helpers below are shared by the adapter modules: resolving ``data.source``,
unpacking a user's archive into scratch space, finding a layout inside it.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

from vesselseg import atomic
from vesselseg.data.archive import safe_extract
from vesselseg.data.sample import RawSample
from vesselseg.errors import DataError, ParamsError, VesselsegError
from vesselseg.params import DataParams

log = logging.getLogger(__name__)


@runtime_checkable
class Adapter(Protocol):
    name: str

    def materialize(self, raw_dir: Path, *, source: Path | None, params: DataParams) -> None: ...

    def samples(self, raw_dir: Path, params: DataParams) -> list[RawSample]: ...


# name -> "module:Class"; a string so that adapter modules load lazily.
_REGISTRY: dict[str, str] = {
    "synthetic": "vesselseg.data.octa500:SyntheticOctaAdapter",
    "synthetic-fundus": "vesselseg.data.retina:SyntheticFundusAdapter",
    "drive": "vesselseg.data.retina:DriveAdapter",
    "octa500": "vesselseg.data.octa500:Octa500Adapter",
    "hrf": "vesselseg.data.retina:HrfAdapter",
    "chase_db1": "vesselseg.data.retina:ChaseAdapter",
    "stare": "vesselseg.data.retina:StareAdapter",
    "retina_kaggle": "vesselseg.data.retina:RetinaKaggleAdapter",
    "lgg_mri": "vesselseg.data.lgg_mri:LggMriAdapter",
    "folder": "vesselseg.data.folder:FolderAdapter",
}


def adapter_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_adapter(name: str) -> Adapter:
    """Return a fresh adapter for ``name``; an unknown name is a ParamsError on data.dataset."""
    target = _REGISTRY.get(name)
    if target is None:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ParamsError(f"data.dataset: unknown dataset {name!r}{hint} (valid: {', '.join(_REGISTRY)})")
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)()


# ---------------------------------------------------------------- shared helpers


def split_source(source: Path | str | None, dataset: str, layout: str) -> list[Path]:
    """``data.source`` as a list of existing paths (several joined by ``os.pathsep``).

    Bring-your-own datasets have no default location on purpose: guessing one would
    make a run depend on whatever happens to lie there.
    """
    if source is None or str(source).strip() == "":
        raise ParamsError(
            f"data.source: not set; dataset {dataset!r} is not downloaded automatically: set it to {layout}"
        )
    paths = [Path(p).expanduser() for p in str(source).split(os.pathsep) if p.strip()]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise ParamsError(f"data.source: {', '.join(missing)} does not exist (dataset {dataset!r} expects {layout})")
    return paths


@contextlib.contextmanager
def scratch_dir(near: Path) -> Iterator[Path]:
    """A temporary folder beside ``near`` (same file system, so moves are renames)."""
    near.parent.mkdir(parents=True, exist_ok=True)
    # .tmp-<pid>-: a killed run's leftover is removed by vesselseg.atomic.sweep_stale
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-scratch-{near.name}-", dir=near.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class Unpacked:
    """``data.source`` ready to read: folders in place (read only), archives extracted
    into ``scratch``; and the names the user knows for files read from scratch.

    A file extracted from ``/u/DRIVE.zip`` is named ``/u/DRIVE.zip:training/images/21_training.tif``
    in messages (:meth:`rename`), never by its temporary path.
    """

    def __init__(self, paths: Iterable[Path], scratch: Path) -> None:
        self.scratch = scratch
        self.bases: list[Path] = []
        self._names: list[tuple[str, str]] = []  # (path prefix as read, what the user knows)
        for i, path in enumerate(paths):
            if path.is_dir():
                self.bases.append(path)
            else:
                out = scratch / f"source{i}"
                safe_extract(path, out)
                self.bases.append(out)
                self._names += [(f"{out}{os.sep}", f"{path}:"), (str(out), str(path))]

    def alias(self, read: Path, shown: str) -> None:
        """Name ``read`` (a decompressed copy, say) as ``shown`` in messages."""
        self._names.append((str(read), shown))

    def rename(self, text: str) -> str:
        """``text`` with every path as read replaced by the name the user knows."""
        for read, shown in sorted(self._names, key=lambda pair: -len(pair[0])):
            text = text.replace(read, shown)
        return text


@contextlib.contextmanager
def unpacked_source(paths: Iterable[Path], raw_dir: Path) -> Iterator[Unpacked]:
    """:class:`Unpacked` in a scratch folder beside ``raw_dir``, removed afterwards.

    Any error raised inside names what the user knows (``<archive>:<member>``), not
    the scratch folder: one place for every message, whichever helper raised it.
    """
    with scratch_dir(raw_dir) as scratch:
        unpacked = Unpacked(paths, scratch)
        try:
            yield unpacked
        except VesselsegError as err:
            renamed = unpacked.rename(str(err))
            if renamed == str(err):
                raise
            raise type(err)(renamed) from None


def find_dir(bases: Iterable[Path], accept: Callable[[Path], bool], what: str, max_depth: int = 4) -> Path:
    """The shallowest folder under ``bases`` that ``accept`` takes (archives nest roots)."""
    bases = list(bases)
    level = list(bases)
    for _ in range(max_depth + 1):
        for d in sorted(level):
            if accept(d):
                return d
        level = [c for d in level for c in sorted(d.iterdir()) if c.is_dir() and not c.name.startswith(".")]
        if not level:
            break
    raise DataError(f"{', '.join(map(str, bases))}: no folder with {what} found (searched {max_depth} levels deep)")


def missing_error(root: Path, missing: list[str], dataset: str) -> DataError:
    shown = ", ".join(missing[:12]) + (f" and {len(missing) - 12} more" if len(missing) > 12 else "")
    return DataError(f"{root}: {dataset} is incomplete: {len(missing)} expected file(s) missing: {shown}")


def listing_error(root: Path | str, what: str, names: list[str]) -> DataError:
    """One line naming ``root``, how many ``what`` and the first dozen ``names``."""
    shown = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
    return DataError(f"{root}: {len(names)} {what}: {shown}")


MARKER = "vesselseg-dataset.json"


@contextlib.contextmanager
def building(raw_dir: Path, dataset: str) -> Iterator[Path]:
    """:func:`vesselseg.atomic.atomic_dir` that also stamps the dataset name into the folder."""
    with atomic.atomic_dir(raw_dir) as tmp:
        yield tmp
        mark_raw(tmp, dataset)


def mark_raw(folder: Path, dataset: str) -> None:
    """Record which dataset a raw folder holds (DRIVE and synthetic-fundus look alike)."""
    atomic.write_json(Path(folder) / MARKER, {"dataset": dataset})


def require_raw(raw_dir: Path, dataset: str) -> Path:
    """The raw folder, checked to exist and to hold ``dataset`` (not a stale other one)."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise DataError(f"{raw_dir}: raw data for {dataset!r} not found; run the download stage first")
    marker = raw_dir / MARKER
    try:
        held = json.loads(marker.read_text()).get("dataset")
    except FileNotFoundError:
        log.warning("%s: no %s; cannot check that it holds %r", raw_dir, MARKER, dataset)
        return raw_dir
    except (OSError, json.JSONDecodeError, AttributeError):
        raise DataError(f"{marker}: unreadable; run the download stage again") from None
    if held != dataset:
        raise DataError(
            f"{raw_dir}: holds dataset {held!r} but data.dataset is {dataset!r}; run the download stage again"
        )
    return raw_dir
