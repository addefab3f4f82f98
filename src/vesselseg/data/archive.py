"""Extract zip and tar archives without trusting their member names.

Dataset archives come from third-party web sites.  Every member is checked *before*
anything is written: no absolute paths, no ``..``, no links leading out of the
destination, no device or FIFO files.  Extraction then goes into a temporary folder
beside ``dest`` and is moved into place only when the whole archive was read, so a
refused or truncated archive leaves nothing behind.

Tar extraction additionally uses Python's ``filter="data"`` (3.11.4+), which re-checks
link targets against the real file system at extraction time; our own checks come
first so the error names the archive and the member.  Zip members are checked here
only: ``zipfile`` has no such filter.
"""

from __future__ import annotations

import logging
import os
import posixpath
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path

from vesselseg.errors import DownloadError

log = logging.getLogger(__name__)


def _bad_name(name: str) -> str | None:
    """Why a member name may not be extracted, or None when it is safe."""
    if not name or "\x00" in name:
        return "empty or NUL in name"
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        return "'..' in path"
    return None


def _inside(link_from_dir: str, target: str) -> bool:
    """True when ``target`` (relative to ``link_from_dir``) stays inside the root, lexically.

    Any ``..`` in a link target is refused outright: lexical normalisation cannot see
    that ``a/..`` leaves the root when ``a`` is itself a link to ``.``.
    """
    if not target or target.startswith(("/", "\\")) or (len(target) > 1 and target[1] == ":"):
        return False
    if ".." in target.replace("\\", "/").split("/"):
        return False
    joined = posixpath.normpath(posixpath.join(link_from_dir, target))
    return not (joined == ".." or joined.startswith("../") or joined.startswith("/"))


def _check_tar(archive: Path, tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    members = tar.getmembers()  # reads the whole index: a truncated tar fails here
    for m in members:
        why = _bad_name(m.name)
        if why is None and (m.ischr() or m.isblk() or m.isfifo()):
            why = "device or FIFO file"
        elif why is None and m.issym() and not _inside(posixpath.dirname(m.name), m.linkname):
            why = f"symlink to {m.linkname!r} outside the destination"
        elif why is None and m.islnk() and not _inside("", m.linkname):
            why = f"hardlink to {m.linkname!r} outside the destination"
        elif why is None and not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
            why = f"unsupported member type {m.type!r}"
        if why:
            raise DownloadError(f"{archive}: refusing member {m.name!r}: {why}")
    return members


def _check_zip(archive: Path, zf: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    infos = zf.infolist()
    for info in infos:
        why = _bad_name(info.filename)
        mode = info.external_attr >> 16
        if why is None and stat.S_ISLNK(mode):
            # zipfile would write the link target as a plain file's content: wrong either way.
            why = "symlink (links in zip archives are not supported)"
        elif why is None and mode and (stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode)):
            why = "device or FIFO file"
        if why:
            raise DownloadError(f"{archive}: refusing member {info.filename!r}: {why}")
    return infos


def archive_kind(archive: Path) -> str:
    """'zip' or 'tar' (any compression tarfile knows), judged by content, not by suffix."""
    if zipfile.is_zipfile(archive):
        return "zip"
    try:
        if tarfile.is_tarfile(archive):
            return "tar"
    except OSError:
        pass
    raise DownloadError(f"{archive}: not a zip or tar archive (or truncated beyond recognition)")


def safe_extract(archive: Path, dest: Path) -> list[Path]:
    """Extract ``archive`` into ``dest`` and return the extracted files, sorted.

    ``dest`` may exist; a top-level entry of the archive that already exists there is
    an error (we never overwrite).  Raises DownloadError naming the archive and the
    offending member, with nothing written, on any unsafe member or read failure.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise DownloadError(f"{archive}: archive not found")
    kind = archive_kind(archive)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # .tmp-<pid>-: a killed run's leftover is removed by vesselseg.atomic.sweep_stale
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-extract-{dest.name}-", dir=dest.parent))
    try:
        try:
            if kind == "zip":
                with zipfile.ZipFile(archive) as zf:
                    _check_zip(archive, zf)
                    zf.extractall(tmp)
            else:
                with tarfile.open(archive) as tar:
                    _check_tar(archive, tar)
                    tar.extractall(tmp, filter="data")
        except DownloadError:
            raise
        except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as err:
            raise DownloadError(
                f"{archive}: cannot extract, archive is corrupt or truncated ({type(err).__name__}: {err})"
            ) from None
        rel = [p.relative_to(tmp) for p in tmp.rglob("*") if p.is_file() or p.is_symlink()]
        _move_into(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files = sorted(dest / r for r in rel)
    log.info("%s: extracted %d files into %s", archive.name, len(files), dest)
    return files


def _move_into(src: Path, dest: Path) -> None:
    """Move the extracted tree into ``dest``; all collisions are found before moving."""
    entries = sorted(src.iterdir())
    if dest.exists():
        clash = [e.name for e in entries if (dest / e.name).exists() or (dest / e.name).is_symlink()]
        if clash:
            raise DownloadError(f"{dest}: already holds {', '.join(clash[:5])}; refusing to overwrite")
    else:
        os.replace(src, dest)
        src.mkdir()  # so the caller's rmtree has something to remove
        return
    for entry in entries:
        os.replace(entry, dest / entry.name)
