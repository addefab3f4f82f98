"""Fetch one file over HTTP(S), resumably, and prove it is the file we meant.

Only ``urllib.request`` is used: the download stage must work in a bare venv and
behind the simplest proxies (urllib honours ``https_proxy``).  A file is first
streamed to ``<name>.part``; it takes its final name only after its sha256 matched,
so the final path always holds a verified file and a re-run skips the network.

Publishers that give no checksum get ``sha256=None`` in their :class:`DownloadSpec`
unless a well-kept downstream project pinned one (STARE: torch-em's sha256 pins;
CHASE_DB1: an md5 pin, the only published one, kept in ``md5``).  A user pins a
sha256 with the environment variable named by :func:`sha256_env_var` after checking
the file; it wins over both constants.  An unpinned file is never used silently: the
error prints the hash of what was fetched so it can be compared and pinned.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from vesselseg.errors import DownloadError

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_MD5_RE = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class DownloadSpec:
    """Where a file lives and what it must hash to (``sha256=None``: not pinned yet).

    ``md5`` is a weaker fallback pin, checked only when no sha256 is in force: some
    datasets' only published checksum is an md5.
    """

    url: str
    sha256: str | None
    filename: str
    md5: str | None = None

    def __post_init__(self) -> None:
        if self.sha256 is not None and not _SHA256_RE.match(self.sha256):
            raise ValueError(f"{self.filename}: sha256 must be 64 lower-case hex digits, got {self.sha256!r}")
        if self.md5 is not None and not _MD5_RE.match(self.md5):
            raise ValueError(f"{self.filename}: md5 must be 32 lower-case hex digits, got {self.md5!r}")
        if not self.filename or "/" in self.filename or self.filename in (".", ".."):
            raise ValueError(f"DownloadSpec.filename must be a plain file name, got {self.filename!r}")


def sha256_env_var(spec: DownloadSpec) -> str:
    """``CHASEDB1.zip`` -> ``VESSELSEG_SHA256_CHASEDB1_ZIP``: the user's pin for that file."""
    return "VESSELSEG_SHA256_" + re.sub(r"[^0-9A-Za-z]+", "_", spec.filename).upper()


def expected_sha256(spec: DownloadSpec) -> str | None:
    """The pin in force: the environment variable wins over the spec's constant."""
    override = os.environ.get(sha256_env_var(spec), "").strip().lower()
    if override:
        if not _SHA256_RE.match(override):
            raise DownloadError(f"{sha256_env_var(spec)}={override!r}: not a sha256 (64 hex digits)")
        return override
    return spec.sha256


def sha256_of(path: Path) -> str:
    return _digest(path, "sha256")


def _digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(spec: DownloadSpec, path: Path) -> tuple[bool | None, str]:
    """Check ``path`` against the pin in force: (True/False, or None when nothing is
    pinned; a description of the file's hash for messages)."""
    expected = expected_sha256(spec)
    actual = sha256_of(path)
    if expected is not None:
        return actual == expected, f"sha256 {actual}"
    if spec.md5 is not None:
        md5 = _digest(path, "md5")
        return md5 == spec.md5, f"md5 {md5} (sha256 {actual})"
    return None, f"sha256 {actual}"


def pin_text(spec: DownloadSpec) -> str:
    """The pin in force, for messages: ``sha256 <hex>``, ``md5 <hex>`` or how to set one."""
    expected = expected_sha256(spec)
    if expected is not None:
        return f"sha256 {expected}"
    if spec.md5 is not None:
        return f"md5 {spec.md5}"
    return f"sha256 none pinned (set {sha256_env_var(spec)})"


def _fail(spec: DownloadSpec, final: Path, what: str) -> DownloadError:
    """One message holding everything needed to finish the job by hand."""
    return DownloadError(
        f"{spec.url}: {what}; expected {pin_text(spec)}; you may download it manually and place it at {final}"
    )


def _unpinned(spec: DownloadSpec, final: Path, actual: str) -> DownloadError:
    return DownloadError(
        f"{spec.url}: no sha256 is pinned for {spec.filename}; {final} has sha256 {actual}: "
        f"compare it with the publisher's copy, then set {sha256_env_var(spec)}={actual} to use it"
    )


def download(spec: DownloadSpec, dest_dir: Path, *, timeout: float = 60.0, progress: bool | None = None) -> Path:
    """Download ``spec`` into ``dest_dir`` and return the verified file's path.

    A verified file already in place is reused without touching the network; a
    ``.part`` left by an interrupted run is resumed with an HTTP Range request when
    the server honours it, otherwise restarted from zero.  ``progress=None`` shows the
    bar only on a terminal (tqdm's ``disable=None``).
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / spec.filename
    part = dest_dir / (spec.filename + ".part")
    expected_sha256(spec)  # a malformed pin in the environment fails before any network
    if final.is_file():
        ok, actual = verify(spec, final)
        if ok is None:
            raise _unpinned(spec, final, actual.removeprefix("sha256 "))
        if ok:
            log.info("%s: already downloaded and verified", final)
            return final
        # Never delete a file the user may have placed by hand; say what to do instead.
        raise DownloadError(
            f"{final}: {actual} does not match the expected {pin_text(spec)} for {spec.url}; delete or replace the file"
        )

    _fetch(spec, part, final, timeout=timeout, progress=progress)
    ok, actual = verify(spec, part)
    if ok is False:
        part.unlink(missing_ok=True)
        raise _fail(spec, final, f"checksum mismatch (got {actual}); the bad download was removed")
    with open(part, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(part, final)
    if ok is None:
        raise _unpinned(spec, final, actual.removeprefix("sha256 "))
    log.info("%s: downloaded and verified (%s)", final, actual)
    return final


def _fetch(spec: DownloadSpec, part: Path, final: Path, *, timeout: float, progress: bool | None) -> None:
    """Stream the URL into ``part``, appending when the server resumes at our offset."""
    offset = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": "vesselseg-download/1", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(spec.url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            # Range beyond the end: the partial file is already complete; the checksum decides.
            log.info("%s: server says the partial download is complete", part)
            return
        raise _fail(spec, final, f"HTTP error {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", err)
        raise _fail(spec, final, f"cannot connect or request failed ({reason})") from None

    with response:
        status = getattr(response, "status", 200)
        resumed = offset > 0 and status == 206 and _range_start(response.headers.get("Content-Range")) == offset
        if offset and not resumed:
            log.info("%s: server does not resume at byte %d; restarting the download", spec.url, offset)
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        received = 0
        try:
            with (
                open(part, "ab" if resumed else "wb") as out,
                tqdm(
                    total=total,
                    initial=offset,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=spec.filename,
                    disable=None if progress is None else not progress,
                    leave=False,
                ) as bar,
            ):
                while True:
                    block = response.read(_CHUNK)
                    if not block:
                        break
                    out.write(block)
                    received += len(block)
                    bar.update(len(block))
        except (TimeoutError, OSError, http.client.HTTPException) as err:
            raise _fail(
                spec, final, f"connection lost after {offset + received} bytes ({err}); re-run to resume"
            ) from None
    if total is not None and offset + received < total:
        raise _fail(spec, final, f"transfer ended after {offset + received} of {total} bytes; re-run to resume")


def _range_start(content_range: str | None) -> int | None:
    """``bytes 100-199/200`` -> 100; anything else -> None."""
    match = re.match(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)", content_range or "")
    return int(match.group(1)) if match else None
