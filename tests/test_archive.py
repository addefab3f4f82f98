"""safe_extract(): good archives extract; unsafe or truncated ones leave nothing behind."""

from __future__ import annotations

import hashlib
import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.conftest_http import LocalServer, http_server  # noqa: F401 (fixture)
from vesselseg.data.archive import safe_extract
from vesselseg.data.download import DownloadSpec, download
from vesselseg.errors import DownloadError

pytestmark = pytest.mark.timeout(30)

FILES = {"top/a.txt": b"alpha" * 100, "top/sub/b.bin": bytes(range(256)) * 40, "c.txt": b"gamma"}


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", **attrs: object) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in attrs.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data) if data else None)


def make_tar(path: Path, files: dict[str, bytes], mode: str = "w", extra: list[dict] | None = None) -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in files.items():
            _add(tar, name, data)
        for member in extra or []:
            _add(tar, **member)
    return path


def make_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return path


def _assert_extracted(dest: Path, out: list[Path], files: dict[str, bytes]) -> None:
    assert out == sorted(dest / n for n in files)
    for name, data in files.items():
        assert (dest / name).read_bytes() == data


def _assert_nothing_left(tmp_path: Path, dest: Path, keep: set[str]) -> None:
    assert not dest.exists()
    assert {p.name for p in tmp_path.iterdir()} == keep  # no temp folders, nothing outside


@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz"])
def test_good_archives_extract_exactly_their_files(tmp_path: Path, kind: str) -> None:
    archive = tmp_path / f"good.{kind}"
    if kind == "zip":
        make_zip(archive, FILES)
    else:
        make_tar(archive, FILES, "w:gz" if kind == "tar.gz" else "w")
    dest = tmp_path / "out"
    out = safe_extract(archive, dest)
    _assert_extracted(dest, out, FILES)
    assert {p.name for p in tmp_path.iterdir()} == {archive.name, "out"}


def test_symlink_inside_the_destination_is_allowed(tmp_path: Path) -> None:
    archive = make_tar(
        tmp_path / "l.tar", {"d/a.txt": b"x"}, extra=[{"name": "d/link", "type": tarfile.SYMTYPE, "linkname": "a.txt"}]
    )
    safe_extract(archive, tmp_path / "out")
    assert (tmp_path / "out" / "d" / "link").is_symlink()
    assert (tmp_path / "out" / "d" / "link").read_bytes() == b"x"


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_truncated_archive_leaves_nothing(tmp_path: Path, kind: str) -> None:
    whole = tmp_path / f"whole.{kind}"
    big = {f"f{i}.bin": hashlib.sha256(str(i).encode()).digest() * 2000 for i in range(5)}
    make_zip(whole, big) if kind == "zip" else make_tar(whole, big, "w:gz")
    data = whole.read_bytes()
    whole.unlink()
    cut = tmp_path / f"cut.{kind}"
    # A zip keeps its index at the end: cut its middle out, keeping the index, so the
    # reader gets past the index and fails on the data, the harder case.
    cut.write_bytes(data[: len(data) // 3] + data[2 * len(data) // 3 :] if kind == "zip" else data[: len(data) // 2])
    dest = tmp_path / "out"
    with pytest.raises(DownloadError, match=r"cut\." + kind.replace(".", r"\.")):
        safe_extract(cut, dest)
    _assert_nothing_left(tmp_path, dest, {cut.name})


TAR_ATTACKS = {
    "absolute": {"name": "/tmp/evil.txt", "data": b"x"},
    "dotdot": {"name": "a/../../evil.txt", "data": b"x"},
    "symlink_out": {"name": "link", "type": tarfile.SYMTYPE, "linkname": "../outside"},
    "symlink_abs": {"name": "link", "type": tarfile.SYMTYPE, "linkname": "/etc/passwd"},
    "symlink_dotdot_trick": {"name": "d/link", "type": tarfile.SYMTYPE, "linkname": "x/../.."},
    "hardlink_out": {"name": "hl", "type": tarfile.LNKTYPE, "linkname": "../outside"},
    "hardlink_abs": {"name": "hl", "type": tarfile.LNKTYPE, "linkname": "/etc/passwd"},
    "chardev": {"name": "dev", "type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3},
    "blockdev": {"name": "blk", "type": tarfile.BLKTYPE, "devmajor": 8, "devminor": 0},
    "fifo": {"name": "pipe", "type": tarfile.FIFOTYPE},
}


@pytest.mark.parametrize("attack", sorted(TAR_ATTACKS))
def test_malicious_tar_members_are_refused_and_nothing_extracted(tmp_path: Path, attack: str) -> None:
    member = TAR_ATTACKS[attack]
    archive = make_tar(tmp_path / "evil.tar", {"ok/first.txt": b"harmless"}, extra=[member])
    (tmp_path / "outside").write_text("precious")
    dest = tmp_path / "work" / "out"
    with pytest.raises(DownloadError) as exc:
        safe_extract(archive, dest)
    assert "evil.tar" in str(exc.value) and repr(member["name"]) in str(exc.value)
    assert (tmp_path / "outside").read_text() == "precious"
    assert list((tmp_path / "work").iterdir()) == []  # not even the harmless first member


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("/abs/evil.txt", 0o100644),
        ("a/../../evil.txt", 0o100644),
        ("link", stat.S_IFLNK | 0o777),
        ("dev", stat.S_IFCHR | 0o644),
    ],
)
def test_malicious_zip_members_are_refused(tmp_path: Path, name: str, mode: int) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok/first.txt", b"harmless")
        info = zipfile.ZipInfo(name)
        info.external_attr = mode << 16
        zf.writestr(info, b"../outside")
    dest = tmp_path / "work" / "out"
    with pytest.raises(DownloadError) as exc:
        safe_extract(archive, dest)
    assert "evil.zip" in str(exc.value) and repr(name) in str(exc.value)
    assert list((tmp_path / "work").iterdir()) == []


def test_existing_entries_are_never_overwritten(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "a.zip", FILES)
    dest = tmp_path / "out"
    (dest / "top").mkdir(parents=True)
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(DownloadError, match="refusing to overwrite"):
        safe_extract(archive, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["keep.txt", "top"]
    assert list((dest / "top").iterdir()) == []
    (dest / "top").rmdir()
    out = safe_extract(archive, dest)  # merging beside existing files is fine
    _assert_extracted(dest, out, FILES)
    assert (dest / "keep.txt").read_text() == "mine"


def test_not_an_archive(tmp_path: Path) -> None:
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"<html>login page</html>")
    with pytest.raises(DownloadError, match=r"junk\.zip: not a zip or tar"):
        safe_extract(junk, tmp_path / "out")


def test_download_then_extract_through_http(http_server: LocalServer, tmp_path: Path) -> None:
    good = make_tar(http_server.root / "good.tar.gz", FILES, "w:gz")
    spec = DownloadSpec(http_server.url(good.name), hashlib.sha256(good.read_bytes()).hexdigest(), good.name)
    dest = tmp_path / "out"
    _assert_extracted(dest, safe_extract(download(spec, tmp_path / "dl", progress=False), dest), FILES)

    # A truncated archive whose (matching) checksum was pinned: download passes, extraction refuses.
    cut = http_server.root / "cut.tar.gz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    spec = DownloadSpec(http_server.url(cut.name), hashlib.sha256(cut.read_bytes()).hexdigest(), cut.name)
    dest2 = tmp_path / "out2"
    with pytest.raises(DownloadError, match=r"cut\.tar\.gz"):
        safe_extract(download(spec, tmp_path / "dl", progress=False), dest2)
    assert not dest2.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
