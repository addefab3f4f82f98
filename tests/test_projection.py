"""OCTA projection: hand-computed volumes written as BMP, orientation, sort order, errors."""

from __future__ import annotations

import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image

from vesselseg import imagefiles
from vesselseg.errors import DataError, ParamsError
from vesselseg.preprocess.projection import (
    SlabError,
    parse_bmp_header,
    project_array,
    project_volume,
    read_slice,
)

# B-scan j, depth row d, lateral column x holds 100*j + 10*d + x: every voxel is
# distinct and each reduction has a closed form, computed by hand below.
N_BSCANS, DEPTH, WIDTH = 3, 4, 5


def hand_volume() -> np.ndarray:
    j, d, x = np.meshgrid(np.arange(N_BSCANS), np.arange(DEPTH), np.arange(WIDTH), indexing="ij")
    return (100 * j + 10 * d + x).astype(np.uint8)


def expected(method: str, slab: tuple[int, int] | None) -> np.ndarray:
    """out[x, j] by hand: over rows a..b-1 the term 10*d has mean 5*(a+b-1), max 10*(b-1), min 10*a."""
    a, b = (0, DEPTH) if slab is None else slab
    depth_term = {"mean": 5.0 * (a + b - 1), "max": 10.0 * (b - 1), "min": 10.0 * a}[method]
    x = np.arange(WIDTH)[:, None]
    j = np.arange(N_BSCANS)[None, :]
    return (100.0 * j + depth_term + x).astype(np.float32)


def write_bmp8(
    path: Path, img: np.ndarray, *, top_down: bool = False, palette: np.ndarray | None = None, info_size: int = 40
) -> None:
    """An 8-bit palette BMP written by hand (independent of the code under test)."""
    h, w = img.shape
    stride = (w + 3) // 4 * 4
    pal = np.stack([np.arange(256)] * 3 + [np.zeros(256, int)], axis=1) if palette is None else palette
    pal_bytes = pal.astype(np.uint8).tobytes()
    offset = 14 + info_size + len(pal_bytes)
    rows = img if top_down else img[::-1]
    pix = np.zeros((h, stride), np.uint8)
    pix[:, :w] = rows
    info = struct.pack(
        "<IiiHHIIiiII", info_size, w, -h if top_down else h, 1, 8, 0, stride * h, 2835, 2835, len(pal), 0
    )
    info += b"\0" * (info_size - len(info))
    head = b"BM" + struct.pack("<IHHI", offset + stride * h, 0, 0, offset)
    path.write_bytes(head + info + pal_bytes + pix.tobytes())


def write_volume(folder: Path, vol: np.ndarray, **kw: object) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, sl in enumerate(vol, start=1):
        p = folder / f"{k}.bmp"
        if kw:
            write_bmp8(p, sl, **kw)  # type: ignore[arg-type]
        else:
            ok, buf = cv2.imencode(".bmp", sl)
            assert ok
            buf.tofile(p)
        paths.append(p)
    return paths


@pytest.fixture
def volume_files(tmp_path: Path) -> list[Path]:
    return write_volume(tmp_path / "vol", hand_volume())


def test_hand_writer_is_a_valid_bmp(tmp_path: Path) -> None:
    img = hand_volume()[2]
    for top_down in (False, True):
        p = tmp_path / f"t{int(top_down)}.bmp"
        write_bmp8(p, img, top_down=top_down)
        assert np.array_equal(np.asarray(Image.open(p)), img)


@pytest.mark.parametrize("method", ["mean", "max", "min"])
@pytest.mark.parametrize("slab", [None, (1, 3), (0, 1), (3, 4)])
def test_project_volume_matches_hand_values(
    volume_files: list[Path], method: str, slab: tuple[int, int] | None
) -> None:
    out = project_volume(volume_files, method=method, slab=slab)  # type: ignore[arg-type]
    assert out.dtype == np.float32 and out.shape == (WIDTH, N_BSCANS)
    np.testing.assert_array_equal(out, expected(method, slab))


@pytest.mark.parametrize("method", ["mean", "max", "min"])
@pytest.mark.parametrize("slab", [None, (1, 3)])
def test_project_array_matches_hand_values(method: str, slab: tuple[int, int] | None) -> None:
    out = project_array(hand_volume(), method=method, slab=slab)  # type: ignore[arg-type]
    assert out.dtype == np.float32 and out.shape == (WIDTH, N_BSCANS)
    np.testing.assert_array_equal(out, expected(method, slab))


def test_mean_literal_values(volume_files: list[Path]) -> None:
    # Spelled out for B-scan 1, column 2: rows hold 102, 112, 122, 132.
    out = project_volume(volume_files, method="mean")
    assert out[2, 1] == pytest.approx((102 + 112 + 122 + 132) / 4)
    out = project_volume(volume_files, method="max", slab=(0, 2))
    assert out[4, 2] == 214.0  # 200 + 10 + 4


def test_orientation_column_j_is_bscan_j(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vol = rng.integers(0, 256, size=(7, 9, 6), dtype=np.uint8)
    paths = write_volume(tmp_path / "v", vol)
    out = project_volume(paths, method="max")
    for j in range(7):
        np.testing.assert_array_equal(out[:, j], vol[j].max(axis=0))


def test_natural_sort_puts_10_after_2(tmp_path: Path) -> None:
    n = 12
    vol = np.stack([np.full((4, 3), 10 * k, np.uint8) for k in range(1, n + 1)])  # file k holds 10*k
    write_volume(tmp_path / "v", vol)
    slices = imagefiles.list_slices(tmp_path / "v")
    assert [p.name for p in slices][:3] == ["1.bmp", "2.bmp", "3.bmp"] and slices[9].name == "10.bmp"
    out = project_volume(slices, method="mean")
    np.testing.assert_array_equal(out[0], 10.0 * np.arange(1, n + 1))


@pytest.mark.parametrize("top_down", [False, True])
def test_row_padding_and_row_order(tmp_path: Path, top_down: bool) -> None:
    # Width 5 pads rows to 8 bytes; a negative height stores rows top-down.
    paths = write_volume(tmp_path / "v", hand_volume(), top_down=top_down)
    for method in ("mean", "max", "min"):
        np.testing.assert_array_equal(project_volume(paths, method=method, slab=(1, 3)), expected(method, (1, 3)))
    assert np.array_equal(read_slice(paths[1]), hand_volume()[1])


def test_v5_header_is_parsed(tmp_path: Path) -> None:
    paths = write_volume(tmp_path / "v", hand_volume(), info_size=124)
    assert parse_bmp_header(paths[0].read_bytes()) is not None
    np.testing.assert_array_equal(project_volume(paths, method="min"), expected("min", None))


def test_grey_palette_that_is_not_identity_is_applied(tmp_path: Path) -> None:
    inverted = np.stack([255 - np.arange(256)] * 3 + [np.zeros(256, int)], axis=1)
    paths = write_volume(tmp_path / "v", hand_volume(), palette=inverted)
    # Pixel value = 255 - index: max of values is 255 - min of indices.
    np.testing.assert_array_equal(project_volume(paths, method="max"), 255.0 - expected("min", None))
    np.testing.assert_allclose(project_volume(paths, method="mean"), 255.0 - expected("mean", None))


def test_colour_palette_falls_back_to_opencv(tmp_path: Path) -> None:
    colour = np.stack([np.arange(256), np.zeros(256, int), np.zeros(256, int), np.zeros(256, int)], axis=1)  # blue ramp
    paths = write_volume(tmp_path / "v", hand_volume(), palette=colour)
    assert parse_bmp_header(paths[0].read_bytes()) is None
    ref = np.stack([cv2.cvtColor(cv2.imread(str(p), cv2.IMREAD_COLOR), cv2.COLOR_BGR2GRAY) for p in paths])
    np.testing.assert_array_equal(project_volume(paths, method="max"), ref.max(axis=1).T)


def test_png_and_16bit_slices_use_general_decoder(tmp_path: Path) -> None:
    vol = hand_volume().astype(np.uint16) * 200  # up to 46800: needs 16 bits
    folder = tmp_path / "v"
    folder.mkdir()
    paths = []
    for k, sl in enumerate(vol, start=1):
        p = folder / f"{k}.png"
        assert cv2.imwrite(str(p), sl)
        paths.append(p)
    np.testing.assert_allclose(project_volume(paths, method="mean", slab=(1, 3)), expected("mean", (1, 3)) * 200)


def test_workers_give_identical_result(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    vol = rng.integers(0, 256, size=(23, 10, 7), dtype=np.uint8)
    paths = write_volume(tmp_path / "v", vol)
    for method in ("mean", "max", "min"):
        one = project_volume(paths, method=method, slab=(2, 8))
        two = project_volume(paths, method=method, slab=(2, 8), workers=2)
        np.testing.assert_array_equal(one, two)
        np.testing.assert_array_equal(one, project_array(vol, method=method, slab=(2, 8)))


def test_read_slice_matches_pil(volume_files: list[Path]) -> None:
    for p in volume_files:
        np.testing.assert_array_equal(read_slice(p), np.asarray(Image.open(p)))


# --- errors ---------------------------------------------------------------------


def test_slices_of_differing_size(volume_files: list[Path]) -> None:
    _, buf = cv2.imencode(".bmp", np.zeros((DEPTH, WIDTH + 1), np.uint8))
    buf.tofile(volume_files[2])
    with pytest.raises(DataError, match=r"3\.bmp.*B-scan is 6x4.*1\.bmp is 5x4"):
        project_volume(volume_files, method="mean")


def test_truncated_slice(volume_files: list[Path]) -> None:
    data = volume_files[1].read_bytes()
    volume_files[1].write_bytes(data[:-7])
    with pytest.raises(DataError, match=r"2\.bmp: truncated BMP"):
        project_volume(volume_files, method="max")


def test_unreadable_slice(volume_files: list[Path]) -> None:
    volume_files[2].write_bytes(b"this is not an image at all")
    with pytest.raises(DataError, match=r"3\.bmp: not a readable image"):
        project_volume(volume_files, method="min")


def test_missing_slice(volume_files: list[Path]) -> None:
    volume_files[1].unlink()
    with pytest.raises(DataError, match=r"2\.bmp: cannot open"):
        project_volume(volume_files, method="min")


def test_nan_in_float_slices(tmp_path: Path) -> None:
    vol = hand_volume().astype(np.float32)
    vol[1, 2, 3] = np.nan
    paths = []
    for k, sl in enumerate(vol, start=1):
        p = tmp_path / f"{k}.tif"
        tifffile.imwrite(p, sl)
        paths.append(p)
    with pytest.raises(DataError, match=r"2\.tif: B-scan holds NaN or Inf"):
        project_volume(paths, method="mean")
    # The good slices alone project like the hand volume.
    good = project_volume([paths[0], paths[2]], method="mean")
    np.testing.assert_allclose(good, expected("mean", None)[:, [0, 2]])
    with pytest.raises(DataError, match="NaN or Inf"):
        project_array(vol, method="max")
    vol[1, 2, 3] = np.inf
    with pytest.raises(DataError, match="NaN or Inf"):
        project_array(vol, method="mean")


def test_slab_outside_depth(volume_files: list[Path]) -> None:
    with pytest.raises(SlabError, match=r"prepare\.slab: slab \[2, 9\) is outside the volume depth 4 .*1\.bmp") as info:
        project_volume(volume_files, method="mean", slab=(2, 9))
    assert isinstance(info.value, DataError) and isinstance(info.value, ParamsError)
    with pytest.raises(DataError, match=r"slab \[0, 5\) is outside the volume depth 4"):
        project_array(hand_volume(), method="mean", slab=(0, 5))


@pytest.mark.parametrize("slab", [(3, 3), (-1, 2), (3, 1)])
def test_malformed_slab(volume_files: list[Path], slab: tuple[int, int]) -> None:
    with pytest.raises(ParamsError, match=r"prepare\.slab"):
        project_volume(volume_files, method="mean", slab=slab)


def test_unknown_method_and_empty_input(volume_files: list[Path]) -> None:
    with pytest.raises(ParamsError, match=r"prepare\.projection: unknown method 'median'"):
        project_volume(volume_files, method="median")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="no B-scan files"):
        project_volume([], method="mean")
    with pytest.raises(DataError, match=r"\(n_bscans, depth, width\)"):
        project_array(np.zeros((4, 5), np.uint8), method="mean")


@pytest.mark.parametrize("slab", [None, (3, 61), (0, 33)])
def test_deep_padded_slices_match_numpy(tmp_path: Path, slab: tuple[int, int] | None) -> None:
    # 70 rows: the two-level max/min reduction runs (16 stripes + a remainder);
    # width 7: every BMP row carries a padding byte that must not leak into the result.
    rng = np.random.default_rng(11)
    vol = rng.integers(0, 256, size=(5, 70, 7), dtype=np.uint8)
    paths = write_volume(tmp_path / "v", vol)
    for p in paths:  # poison the padding bytes: 255 for max, 0 would be caught by min
        raw = bytearray(p.read_bytes())
        offset = struct.unpack_from("<I", raw, 10)[0]
        for r in range(70):
            raw[offset + r * 8 + 7] = 255 if r % 2 else 0
        p.write_bytes(bytes(raw))
    a, b = (0, 70) if slab is None else slab
    for method, ref in (
        ("max", vol[:, a:b].max(axis=1)),
        ("min", vol[:, a:b].min(axis=1)),
        ("mean", vol[:, a:b].mean(axis=1)),
    ):
        np.testing.assert_allclose(project_volume(paths, method=method, slab=slab), ref.T, rtol=1e-6)  # type: ignore[arg-type]
