"""download(): streaming, resume, checksum pinning and error messages, against a local server."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tests.conftest_http import LocalServer, free_port, http_server  # noqa: F401 (fixture)
from vesselseg.data.download import DownloadSpec, download, expected_sha256, sha256_env_var
from vesselseg.errors import DownloadError

pytestmark = pytest.mark.timeout(30)

PAYLOAD = os.urandom(300_000) + b"end-of-file"
SHA = hashlib.sha256(PAYLOAD).hexdigest()


def _serve(server: LocalServer, name: str = "data.bin", data: bytes = PAYLOAD) -> DownloadSpec:
    (server.root / name).write_bytes(data)
    return DownloadSpec(url=server.url(name), sha256=hashlib.sha256(data).hexdigest(), filename=name)


def test_downloads_verifies_and_then_skips_the_network(http_server: LocalServer, tmp_path: Path) -> None:
    spec = _serve(http_server)
    dest = tmp_path / "dl"
    out = download(spec, dest, progress=False)
    assert out == dest / "data.bin"
    assert out.read_bytes() == PAYLOAD
    assert sorted(p.name for p in dest.iterdir()) == ["data.bin"]  # no .part left
    assert len(http_server.requests) == 1
    assert download(spec, dest, progress=False) == out
    assert len(http_server.requests) == 1  # verified file reused, no second request


def test_checksum_mismatch_names_url_sha_and_manual_path_and_leaves_nothing(
    http_server: LocalServer, tmp_path: Path
) -> None:
    good = _serve(http_server)
    wrong = "0" * 64
    spec = DownloadSpec(url=good.url, sha256=wrong, filename=good.filename)
    dest = tmp_path / "dl"
    with pytest.raises(DownloadError) as exc:
        download(spec, dest, progress=False)
    msg = str(exc.value)
    assert spec.url in msg and wrong in msg and str(dest / "data.bin") in msg and SHA in msg
    assert list(dest.iterdir()) == []


def test_http_404_is_a_download_error(http_server: LocalServer, tmp_path: Path) -> None:
    spec = DownloadSpec(url=http_server.url("nope.zip"), sha256=SHA, filename="nope.zip")
    with pytest.raises(DownloadError, match=r"nope\.zip: HTTP error 404.*place it at .*nope\.zip"):
        download(spec, tmp_path / "dl", progress=False)
    assert list((tmp_path / "dl").iterdir()) == []


def test_connection_refused_is_a_download_error(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/x.zip"
    with pytest.raises(DownloadError, match="cannot connect") as exc:
        download(DownloadSpec(url=url, sha256=SHA, filename="x.zip"), tmp_path, timeout=5, progress=False)
    assert url in str(exc.value) and SHA in str(exc.value)


def test_resumes_a_partial_download_with_range(http_server: LocalServer, tmp_path: Path) -> None:
    spec = _serve(http_server)
    dest = tmp_path / "dl"
    dest.mkdir()
    (dest / "data.bin.part").write_bytes(PAYLOAD[:100_000])
    out = download(spec, dest, progress=False)
    assert out.read_bytes() == PAYLOAD
    assert http_server.requests[-1][1].get("Range") == "bytes=100000-"
    assert http_server.sent == [len(PAYLOAD) - 100_000]  # only the rest was sent


def test_restarts_cleanly_when_the_server_ignores_range(http_server: LocalServer, tmp_path: Path) -> None:
    spec = _serve(http_server)
    http_server.no_range = True
    dest = tmp_path / "dl"
    dest.mkdir()
    (dest / "data.bin.part").write_bytes(b"garbage that must not be kept" * 100)
    assert download(spec, dest, progress=False).read_bytes() == PAYLOAD
    assert http_server.sent == [len(PAYLOAD)]


def test_cut_transfer_keeps_part_and_next_run_resumes(http_server: LocalServer, tmp_path: Path) -> None:
    spec = _serve(http_server)
    http_server.truncate["data.bin"] = 50_000
    dest = tmp_path / "dl"
    with pytest.raises(DownloadError, match="re-run to resume"):
        download(spec, dest, progress=False)
    assert not (dest / "data.bin").exists()
    assert (dest / "data.bin.part").stat().st_size == 50_000
    http_server.truncate.clear()
    assert download(spec, dest, progress=False).read_bytes() == PAYLOAD
    assert http_server.sent[-1] == len(PAYLOAD) - 50_000


def test_complete_part_answered_416_is_verified(http_server: LocalServer, tmp_path: Path) -> None:
    spec = _serve(http_server)
    dest = tmp_path / "dl"
    dest.mkdir()
    (dest / "data.bin.part").write_bytes(PAYLOAD)
    assert download(spec, dest, progress=False).read_bytes() == PAYLOAD


def test_unpinned_file_is_refused_with_its_hash_then_accepted_via_env(
    http_server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    served = _serve(http_server, "CHASE-DB1.zip")
    spec = DownloadSpec(url=served.url, sha256=None, filename=served.filename)
    var = sha256_env_var(spec)
    assert var == "VESSELSEG_SHA256_CHASE_DB1_ZIP"
    monkeypatch.delenv(var, raising=False)
    dest = tmp_path / "dl"
    with pytest.raises(DownloadError) as exc:
        download(spec, dest, progress=False)
    assert SHA in str(exc.value) and var in str(exc.value)
    assert (dest / spec.filename).read_bytes() == PAYLOAD  # kept, so pinning needs no re-download
    monkeypatch.setenv(var, SHA.upper())
    assert expected_sha256(spec) == SHA
    n = len(http_server.requests)
    assert download(spec, dest, progress=False).read_bytes() == PAYLOAD
    assert len(http_server.requests) == n
    monkeypatch.setenv(var, "not-a-hash")
    with pytest.raises(DownloadError, match=var):
        download(spec, dest, progress=False)


def test_existing_file_with_wrong_hash_is_reported_not_deleted(http_server: LocalServer, tmp_path: Path) -> None:
    spec = _serve(http_server)
    dest = tmp_path / "dl"
    dest.mkdir()
    (dest / "data.bin").write_bytes(b"placed by hand, wrong")
    with pytest.raises(DownloadError, match="does not match"):
        download(spec, dest, progress=False)
    assert (dest / "data.bin").read_bytes() == b"placed by hand, wrong"
    assert http_server.requests == []


def test_spec_rejects_malformed_pins_and_names() -> None:
    with pytest.raises(ValueError, match="sha256 must be 64"):
        DownloadSpec(url="http://x/y", sha256="abc", filename="y")
    with pytest.raises(ValueError, match="plain file name"):
        DownloadSpec(url="http://x/y", sha256=None, filename="../y")
    with pytest.raises(ValueError, match="md5"):
        DownloadSpec(url="http://x/y", sha256=None, filename="y", md5="xyz")


def test_md5_pin_verifies_when_no_sha256_is_in_force(
    http_server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some datasets' only published checksum is an md5 (CHASE_DB1): it is a real pin,
    a wrong file is removed with both hashes named, and a user's sha256 wins over it."""
    served = _serve(http_server, "CHASEDB1.zip")
    md5 = hashlib.md5(PAYLOAD).hexdigest()
    monkeypatch.delenv(sha256_env_var(served), raising=False)
    good = DownloadSpec(url=served.url, sha256=None, filename=served.filename, md5=md5)
    assert download(good, tmp_path / "a", progress=False).read_bytes() == PAYLOAD
    bad = DownloadSpec(url=served.url, sha256=None, filename=served.filename, md5="0" * 32)
    with pytest.raises(DownloadError) as exc:
        download(bad, tmp_path / "b", progress=False)
    assert f"md5 {'0' * 32}" in str(exc.value) and f"md5 {md5}" in str(exc.value) and served.url in str(exc.value)
    assert not (tmp_path / "b" / "CHASEDB1.zip").exists() and not (tmp_path / "b" / "CHASEDB1.zip.part").exists()
    monkeypatch.setenv(sha256_env_var(served), SHA)  # the user's verified sha256 wins over a wrong md5
    assert download(bad, tmp_path / "b", progress=False).read_bytes() == PAYLOAD


def test_shipped_specs_pin_every_download() -> None:
    """Every dataset the stage downloads carries a pin (sha256, or md5 where that is all there is)."""
    from vesselseg.data.retina import ChaseAdapter, HrfAdapter, StareAdapter

    for adapter in (HrfAdapter, ChaseAdapter, StareAdapter):
        for spec in adapter.specs:
            assert spec.sha256 is not None or spec.md5 is not None, spec
