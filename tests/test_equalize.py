"""Channel choice, equalization, gamma and projection scaling against hand-computed values."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from vesselseg.errors import DataError, ParamsError
from vesselseg.preprocess.equalize import (
    equalize,
    equalize_hist_masked,
    gamma_lut,
    select_channel,
    to_uint8_projection,
)


def low_contrast(shape: tuple[int, int] = (64, 64), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(100, 120, shape[1])[None, :] + rng.normal(0, 2, shape)
    return np.clip(np.rint(ramp), 0, 255).astype(np.uint8)


# --- select_channel --------------------------------------------------------------


def test_select_channel() -> None:
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 0] = (100, 50, 200)
    rgb[1, 2] = (10, 20, 30)
    np.testing.assert_array_equal(select_channel(rgb, "green"), rgb[:, :, 1])
    grey = select_channel(rgb, "grey")
    # BT.601 by hand: 0.299*100 + 0.587*50 + 0.114*200 = 82.05; 0.299*10 + 0.587*20 + 0.114*30 = 18.15
    assert grey.shape == (2, 3) and grey[0, 0] == 82 and grey[1, 2] == 18 and grey[0, 1] == 0
    assert select_channel(rgb, "rgb") is rgb
    g = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for ch in ("green", "grey", "rgb"):
        assert select_channel(g, ch) is g  # type: ignore[arg-type]


def test_select_channel_errors() -> None:
    with pytest.raises(ParamsError, match=r"prepare\.channel: unknown channel 'blue'"):
        select_channel(np.zeros((2, 2, 3), np.uint8), "blue")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="must be uint8"):
        select_channel(np.zeros((2, 2), np.float32), "green")
    with pytest.raises(DataError, match="got shape"):
        select_channel(np.zeros((2, 2, 4), np.uint8), "green")


# --- none / global ------------------------------------------------------------------


def test_none_is_identity() -> None:
    g = low_contrast()
    out = equalize(g, method="none")
    np.testing.assert_array_equal(out, g)
    assert out is not g
    rgb = np.random.default_rng(1).integers(0, 256, (8, 9, 3), dtype=np.uint8)
    np.testing.assert_array_equal(equalize(rgb, method="none", gamma=1.0), rgb)


def test_global_known_histogram() -> None:
    # Levels 10, 20, 30, 30: first level -> 0, then round(255 * (cdf - 1) / (4 - 1)).
    img = np.array([[10, 20], [30, 30]], np.uint8)
    want = np.array([[0, 85], [255, 255]], np.uint8)
    np.testing.assert_array_equal(equalize(img, method="global"), want)
    np.testing.assert_array_equal(cv2.equalizeHist(img), want)  # the reference agrees
    # Five levels, one pixel each, plus a duplicate of the middle one: n = 6, first = 1 pixel.
    img = np.array([[0, 50, 100, 100, 150, 250]], np.uint8)
    # cdf - 1 at 50, 100, 150, 250: 1, 3, 4, 5; times 255/5 = 51, 153, 204, 255
    np.testing.assert_array_equal(equalize(img, method="global"), [[0, 51, 153, 153, 204, 255]])


def test_global_masked_counts_fov_only() -> None:
    img = np.zeros((3, 4), np.uint8)
    mask = np.zeros((3, 4), bool)
    mask[1, :] = True
    img[1] = [10, 20, 30, 30]
    img[0, 0] = 77  # outside the mask: must not move, must not count
    out = equalize(img, method="global", mask=mask)
    np.testing.assert_array_equal(out[1], [0, 85, 255, 255])
    np.testing.assert_array_equal(out[~mask], img[~mask])
    # Unmasked, the 8 outside pixels (7 zeros and a 77) would have changed the FOV mapping.
    assert not np.array_equal(equalize(img, method="global")[1], out[1])


def test_masked_equals_cv2_on_random_images() -> None:
    rng = np.random.default_rng(3)
    for _ in range(25):
        h, w = rng.integers(1, 40, 2)
        lo, hi = sorted(rng.integers(0, 256, 2))
        g = rng.integers(lo, hi + 1, (h, w)).astype(np.uint8)
        np.testing.assert_array_equal(equalize_hist_masked(g, np.ones((h, w), bool)), cv2.equalizeHist(g))
        # And the masked values equal equalizing those values on their own.
        m = rng.random((h, w)) < 0.5
        if m.any():
            ref = cv2.equalizeHist(g[m].reshape(1, -1)).ravel()
            np.testing.assert_array_equal(equalize_hist_masked(g, m)[m], ref)


def test_global_constant_image() -> None:
    img = np.full((4, 4), 37, np.uint8)
    np.testing.assert_array_equal(equalize(img, method="global"), cv2.equalizeHist(img))
    np.testing.assert_array_equal(equalize(img, method="global", mask=np.ones((4, 4), bool)), img)


# --- CLAHE -----------------------------------------------------------------------------


def test_clahe_equals_opencv_and_raises_contrast() -> None:
    g = low_contrast()
    out = equalize(g, method="clahe", clahe_clip=3.0, clahe_tile=4)
    ref = cv2.createCLAHE(clipLimit=3.0, tileGridSize=(4, 4)).apply(g)
    np.testing.assert_array_equal(out, ref)
    assert out.std() > 1.5 * g.std()
    assert np.ptp(out) > np.ptp(g)
    # A higher clip limit allows more contrast.
    assert (
        equalize(g, method="clahe", clahe_clip=8.0, clahe_tile=4).std()
        > equalize(g, method="clahe", clahe_clip=1.0, clahe_tile=4).std()
    )


def test_clahe_with_mask_keeps_outside() -> None:
    g = low_contrast()
    mask = np.zeros(g.shape, bool)
    mask[8:56, 8:56] = True
    out = equalize(g, method="clahe", mask=mask)
    ref = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(g)
    np.testing.assert_array_equal(out[mask], ref[mask])
    np.testing.assert_array_equal(out[~mask], g[~mask])


def test_rgb_equalizes_lightness_only() -> None:
    rng = np.random.default_rng(2)
    base = low_contrast((32, 32))
    rgb = np.dstack([base, (base * 0.5).astype(np.uint8), rng.integers(0, 40, (32, 32), dtype=np.uint8)])
    out = equalize(rgb, method="clahe", clahe_clip=2.0, clahe_tile=4)
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)
    lightness_before = lab[:, :, 0].std()
    lab[:, :, 0] = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(4, 4)).apply(np.ascontiguousarray(lab[:, :, 0]))
    np.testing.assert_array_equal(out, cv2.cvtColor(lab, cv2.COLOR_LAB2RGB))
    assert out.shape == rgb.shape and out.dtype == np.uint8
    # Lightness contrast went up.
    assert cv2.cvtColor(out, cv2.COLOR_RGB2LAB)[:, :, 0].std() > 1.5 * lightness_before


# --- gamma ------------------------------------------------------------------------------


def test_gamma_lut_values() -> None:
    lut = gamma_lut(2.0)  # out = 255 * sqrt(in / 255)
    assert lut[0] == 0 and lut[255] == 255
    assert lut[64] == 128  # 255 * sqrt(64/255) = 127.75
    assert lut[16] == 64  # 255 * sqrt(16/255) = 63.87
    assert lut[1] == 16  # 255 * sqrt(1/255) = 15.97
    lut = gamma_lut(0.5)  # out = 255 * (in / 255)^2
    assert lut[128] == 64  # 64.25
    assert lut[200] == 157  # 156.86
    np.testing.assert_array_equal(gamma_lut(1.0), np.arange(256))
    assert np.all(np.diff(gamma_lut(1.7).astype(int)) >= 0)


def test_gamma_applied_after_equalization() -> None:
    img = np.array([[0, 16, 64, 255]], np.uint8)
    np.testing.assert_array_equal(equalize(img, method="none", gamma=2.0), [[0, 64, 128, 255]])
    rgb = np.dstack([img, img, img])
    np.testing.assert_array_equal(equalize(rgb, method="none", gamma=2.0)[:, :, 1], [[0, 64, 128, 255]])
    g = np.array([[10, 20], [30, 30]], np.uint8)  # global -> 0, 85, 255, 255; gamma 0.5 -> 0, 28, 255, 255
    np.testing.assert_array_equal(equalize(g, method="global", gamma=0.5), [[0, 28], [255, 255]])


def test_equalize_errors() -> None:
    g = low_contrast((8, 8))
    with pytest.raises(ParamsError, match=r"prepare\.equalize: unknown method 'hist'"):
        equalize(g, method="hist")  # type: ignore[arg-type]
    with pytest.raises(ParamsError, match=r"prepare\.gamma"):
        equalize(g, method="none", gamma=0.0)
    with pytest.raises(ParamsError, match=r"prepare\.clahe_clip"):
        equalize(g, method="clahe", clahe_clip=-1.0)
    with pytest.raises(ParamsError, match=r"prepare\.clahe_tile"):
        equalize(g, method="clahe", clahe_tile=0)
    with pytest.raises(DataError, match="must be uint8"):
        equalize(g.astype(np.float32), method="global")
    with pytest.raises(DataError, match="mask shape"):
        equalize(g, method="global", mask=np.ones((4, 4), bool))


# --- to_uint8_projection -------------------------------------------------------


def test_to_uint8_projection() -> None:
    proj = np.array([[1.0, 2.0], [3.0, 5.0]], np.float32)
    # (v - 1) / 4 * 255: 0, 63.75, 127.5, 255
    np.testing.assert_array_equal(to_uint8_projection(proj), [[0, 64], [128, 255]])
    np.testing.assert_array_equal(to_uint8_projection(np.full((3, 2), 7.5, np.float32)), np.zeros((3, 2), np.uint8))
    out = to_uint8_projection(np.array([[-2.0, 0.0, 2.0]]))
    np.testing.assert_array_equal(out, [[0, 128, 255]])  # 127.5 rounds to even
    with pytest.raises(DataError, match="NaN or Inf"):
        to_uint8_projection(np.array([[1.0, np.nan]], np.float32))
    with pytest.raises(DataError, match="2D"):
        to_uint8_projection(np.zeros((2, 2, 2), np.float32))
