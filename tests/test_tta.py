"""Test-time augmentation with plain-function predictors: the averaging is proven without a model."""

from __future__ import annotations

import numpy as np
import pytest

from vesselseg.inference.tta import TTA_MODES, predict_with_tta, transforms


class Counting:
    """Wraps a predictor; records every input it is given."""

    def __init__(self, fn):
        self.fn = fn
        self.inputs: list[np.ndarray] = []

    def __call__(self, image: np.ndarray) -> np.ndarray:
        assert image.flags["C_CONTIGUOUS"]  # what torch.from_numpy needs
        self.inputs.append(image.copy())
        return self.fn(image)


def pointwise(image: np.ndarray) -> np.ndarray:
    """Equivariant under every flip and rotation: each pixel depends on itself only."""
    grey = image if image.ndim == 2 else image.mean(axis=2)
    return (grey / 255.0).astype(np.float32)


def ramp(image: np.ndarray) -> np.ndarray:
    """Not equivariant: 0 at the left edge, 1 at the right, whatever the image shows."""
    h, w = image.shape[:2]
    return np.tile(np.linspace(0.0, 1.0, w, dtype=np.float32), (h, 1))


def image(h: int = 6, w: int = 9, c: int | None = None, seed: int = 0) -> np.ndarray:
    shape = (h, w) if c is None else (h, w, c)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_modes() -> None:
    assert TTA_MODES == ("none", "flips", "d4")
    assert [len(transforms(m)) for m in TTA_MODES] == [1, 4, 8]
    assert len(set(transforms("d4"))) == 8 and transforms("d4")[0] == (0, False)
    with pytest.raises(ValueError, match=r"tta mode must be one of \['none', 'flips', 'd4'\], got 'd8'"):
        predict_with_tta(pointwise, image(), "d8")


def test_none_calls_once_and_returns_the_output_itself() -> None:
    img = image()
    sentinel = np.full(img.shape, 0.25, np.float32)
    pred = Counting(lambda x: sentinel)
    out = predict_with_tta(pred, img, "none")
    assert out is sentinel
    assert len(pred.inputs) == 1 and np.array_equal(pred.inputs[0], img)


@pytest.mark.parametrize(("mode", "calls"), [("flips", 4), ("d4", 8)])
@pytest.mark.parametrize(
    "shape", [(6, 9, None), (9, 6, None), (7, 7, None), (6, 9, 3)], ids=["wide", "tall", "square", "rgb"]
)
def test_equivariant_predictor_gives_exactly_the_plain_output(mode: str, calls: int, shape) -> None:
    img = image(*shape)
    pred = Counting(pointwise)
    out = predict_with_tta(pred, img, mode)
    assert len(pred.inputs) == calls
    assert out.dtype == np.float32 and out.shape == img.shape[:2]
    assert np.array_equal(out, pointwise(img))  # bit for bit, not approximately
    # every distinct transform was seen once; rotations by 90° swap height and width
    seen = {x.tobytes() + bytes(str(x.shape), "ascii") for x in pred.inputs}
    assert len(seen) == calls
    if mode == "d4":
        assert sorted({x.shape[:2] for x in pred.inputs}) == sorted({img.shape[:2], img.shape[1::-1]})
    else:
        assert {x.shape for x in pred.inputs} == {img.shape}
    if img.ndim == 3:
        assert all(x.shape[2] == 3 for x in pred.inputs)


def test_flips_average_a_ramp_to_one_half() -> None:
    # identity and vertical flip give the ramp back; horizontal and both flips give it mirrored
    img = image(5, 8)
    out = predict_with_tta(ramp, img, "flips")
    assert np.allclose(out, 0.5, atol=1e-7)


@pytest.mark.parametrize("shape", [(5, 8), (8, 5), (6, 6), (5, 8, 3)])
def test_d4_averages_a_ramp_as_computed_by_hand(shape) -> None:
    h, w = shape[:2]
    img = np.zeros(shape, np.uint8)
    out = predict_with_tta(ramp, img, "d4")
    # Mapped back, the ramp along the columns of the transformed image becomes, per transform:
    # 4 of the 8 run along x (identity, vertical flip -> x; horizontal flip, 180° -> 1 - x)
    # and 4 along y (the 90° and 270° rotations, flipped or not: y and 1 - y each twice).
    x = np.tile(np.linspace(0, 1, w), (h, 1))
    y = np.tile(np.linspace(0, 1, h)[:, None], (1, w))
    expected = (2 * x + 2 * (1 - x) + 2 * y + 2 * (1 - y)) / 8
    assert np.allclose(out, expected, atol=1e-6) and np.allclose(out, 0.5, atol=1e-6)


def test_d4_inverse_maps_a_position_dependent_output_back() -> None:
    # predict marks the top-left pixel of whatever it is given: mapped back, that is a
    # different corner of the original image for each transform, each corner twice
    img = image(4, 7)

    def corner(x: np.ndarray) -> np.ndarray:
        out = np.zeros(x.shape[:2], np.float32)
        out[0, 0] = 1.0
        return out

    out = predict_with_tta(corner, img, "d4")
    expected = np.zeros((4, 7), np.float32)
    for y, x in [(0, 0), (0, 6), (3, 0), (3, 6)]:
        expected[y, x] = 2 / 8
    assert np.array_equal(out, expected)
    out = predict_with_tta(corner, img, "flips")
    assert np.array_equal(out, expected)  # each of the 4 corners once, out of 4 passes: also 1/4


def test_predictor_that_ignores_the_input_shape_is_refused() -> None:
    with pytest.raises(ValueError, match=r"predict returned shape \(4, 7\) for an input of shape \(7, 4\)"):
        predict_with_tta(lambda x: np.zeros((4, 7), np.float32), image(4, 7), "d4")
    with pytest.raises(ValueError, match="image must be"):
        predict_with_tta(pointwise, np.zeros(5, np.uint8), "flips")
