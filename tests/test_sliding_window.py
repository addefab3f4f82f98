"""Stitching is proven without a model (as MONAI's tests do): identity and affine
predictors must give their input back exactly, over shapes that are not multiples
of the stride, both weightings, several channels and a batch of images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vesselseg.inference.sliding_window import compute_starts, importance_map, sliding_window_inference

torch.set_num_threads(1)

WEIGHTINGS = ("constant", "gaussian")


def _ref_starts(size: int, window: int, overlap: float) -> list[int]:
    """nnU-Net's rule written independently: fewest windows at stride <= window*(1-overlap), spread evenly."""
    if size == window:
        return [0]
    n = math.ceil((size - window) / (window * (1 - overlap)) - 1e-9) + 1
    return [int(v) for v in np.round(np.linspace(0, size - window, n))]


def _ref_gaussian(n: int, sigma_scale: float = 0.125) -> np.ndarray:
    centre = (n - 1) / 2.0
    return np.exp(-((np.arange(n) - centre) ** 2) / (2 * (sigma_scale * n) ** 2))


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.75])
@pytest.mark.parametrize("fn", [lambda x: x, lambda x: 2 * x + 1], ids=["identity", "affine"])
def test_reconstructs_input_exactly(weighting: str, overlap: float, fn) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 37, 53, generator=g)  # N=2, 3 channels, not a multiple of any stride
    x_before = x.clone()
    out = sliding_window_inference(x, window=16, overlap=overlap, predictor=fn, weighting=weighting, batch_size=5)
    assert out.shape == x.shape and out.dtype == torch.float32
    # atol 1e-6 plus rtol 1e-6: at overlap 0.75 up to 16 float32 products are summed
    # per pixel, so values near 3 (affine) carry a few ulps (MONAI's error is identical).
    torch.testing.assert_close(out, fn(x_before), atol=1e-6, rtol=1e-6)
    assert torch.equal(x, x_before)  # the caller's tensor is never modified


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_rectangular_window_and_channel_change(weighting: str) -> None:
    x = torch.rand(1, 1, 41, 30, generator=torch.Generator().manual_seed(1))

    def fan_out(t: torch.Tensor) -> torch.Tensor:  # 1 channel in, 3 out: C_out comes from the predictor
        return torch.cat([t, -t, t * t], dim=1)

    out = sliding_window_inference(
        x, window=(20, 12), overlap=0.5, predictor=fan_out, weighting=weighting, batch_size=3
    )
    assert out.shape == (1, 3, 41, 30)
    torch.testing.assert_close(out, fan_out(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_window_equal_to_image_is_one_forward_pass(weighting: str) -> None:
    x = torch.rand(3, 2, 24, 31)
    calls: list[tuple[int, ...]] = []

    def predictor(t: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(t.shape))
        return t

    out = sliding_window_inference(
        x, window=(24, 31), overlap=0.5, predictor=predictor, weighting=weighting, batch_size=2
    )
    assert calls == [(2, 2, 24, 31), (1, 2, 24, 31)]  # whole images, batched
    assert torch.equal(out, x)
    out.add_(1)  # the result must not alias the input even for an identity predictor
    assert not torch.equal(out, x)


@pytest.mark.parametrize(
    ("size", "window", "overlap"),
    [
        (37, 16, 0.25),
        (53, 16, 0.5),
        (53, 16, 0.75),
        (584, 64, 0.5),
        (565, 96, 0.5),
        (400, 128, 0.7),
        (17, 16, 0.5),
        (16, 16, 0.9),
        (100, 1, 0.0),
    ],
)
def test_window_starts_cover_every_pixel(size: int, window: int, overlap: float) -> None:
    starts = compute_starts(size, window, overlap)
    assert starts == _ref_starts(size, window, overlap)
    assert starts[0] == 0 and starts[-1] + window == size  # last window ends on the border
    covered = np.zeros(size, dtype=int)
    for s in starts:
        covered[s : s + window] += 1
    assert covered.min() >= 1
    gaps = np.diff(starts)
    assert (gaps <= max(window * (1 - overlap), 1) + 1e-9).all()  # never a larger stride than asked
    assert len(starts) == 1 or (gaps.max() - gaps.min()) <= 1  # evenly spread


def test_every_pixel_has_weight() -> None:
    ones = torch.ones(1, 1, 45, 70)
    out = sliding_window_inference(ones, window=16, overlap=0.0, predictor=lambda t: t * 0 + 1, weighting="gaussian")
    assert torch.isfinite(out).all() and torch.allclose(out, ones)


def test_importance_map_formula() -> None:
    w = importance_map((12, 20), "gaussian", sigma_scale=0.2).numpy()
    ref = np.outer(_ref_gaussian(12, 0.2), _ref_gaussian(20, 0.2))
    ref = np.maximum(ref, max(ref.min(), 1e-3))
    np.testing.assert_allclose(w, ref, rtol=1e-5)
    assert w.max() <= 1.0 and w.min() >= 1e-3
    assert np.array_equal(importance_map((5, 7), "constant").numpy(), np.ones((5, 7), np.float32))


def test_gaussian_weighting_favours_window_centres() -> None:
    # Each window predicts one constant: its own left edge x0.  Column 16 is the centre
    # of the window at x0=8 and the left border of the window at x0=16.
    cols = torch.arange(32, dtype=torch.float32).expand(1, 1, 16, 32).contiguous()

    def window_start(t: torch.Tensor) -> torch.Tensor:
        return t.amin(dim=(1, 2, 3), keepdim=True).expand_as(t).clone()

    args = dict(window=16, overlap=0.5, predictor=window_start)
    gauss = sliding_window_inference(cols, weighting="gaussian", **args)[0, 0, 8, 16].item()
    const = sliding_window_inference(cols, weighting="constant", **args)[0, 0, 8, 16].item()
    assert const == pytest.approx(12.0)  # plain mean of 8 and 16
    w = np.outer(_ref_gaussian(16), _ref_gaussian(16))
    w = np.maximum(w, max(w.min(), 1e-3))  # both windows cover row 8 at their local row 8
    expected = (8 * w[8, 8] + 16 * w[8, 0]) / (w[8, 8] + w[8, 0])
    assert gauss == pytest.approx(expected, abs=1e-4)
    assert abs(gauss - 8) < 0.01  # the centred window dominates


def test_batch_size_does_not_change_result() -> None:
    net = torch.nn.Conv2d(1, 2, 3, padding=1).eval()
    x = torch.rand(2, 1, 40, 33, generator=torch.Generator().manual_seed(3))
    outs = [
        sliding_window_inference(x, window=16, overlap=0.5, predictor=net, weighting="gaussian", batch_size=b)
        for b in (1, 7, 1000)
    ]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(outs[0], outs[2], atol=1e-6, rtol=0)


def test_progress_bar_and_low_precision_output() -> None:
    x = torch.rand(1, 1, 30, 30)
    out = sliding_window_inference(
        x, window=16, overlap=0.5, predictor=lambda t: t.to(torch.bfloat16), weighting="constant", progress=True
    )
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x, atol=1e-2, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(overlap=1.0), r"overlap must be >= 0 and < 1, got 1\.0"),
        (dict(overlap=-0.1), r"overlap must be >= 0 and < 1, got -0\.1"),
        (dict(window=0), r"window must be >= 1, got 0"),
        (dict(window=(16, 16, 16)), r"window must be an int or a pair of ints"),
        (dict(batch_size=0), r"batch_size must be an int >= 1, got 0"),
        (
            dict(weighting="gausian"),
            r"weighting must be one of \['constant', 'gaussian'\], got 'gausian'; did you mean 'gaussian'\?",
        ),
        (dict(sigma_scale=0.0), r"sigma_scale must be > 0, got 0\.0"),
        (dict(window=40), r"predict\.window 40x40 \(h x w\) is larger than the image 32x48"),
        (dict(window=(16, 49)), r"predict\.window 16x49 .* larger than the image 32x48"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, match: str) -> None:
    args = dict(window=16, overlap=0.5, predictor=lambda t: t, weighting="gaussian", batch_size=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sliding_window_inference(torch.zeros(1, 1, 32, 48), **args)


def test_bad_inputs_and_predictor_output() -> None:
    with pytest.raises(ValueError, match=r"inputs must be an \(N, C, H, W\) tensor, got \(32, 48\)"):
        sliding_window_inference(torch.zeros(32, 48), window=16, overlap=0.5, predictor=lambda t: t)
    with pytest.raises(ValueError, match=r"predictor must return .* got \(4, 1, 8, 8\)"):
        sliding_window_inference(
            torch.zeros(1, 1, 32, 48), window=16, overlap=0.5, predictor=lambda t: t[..., :8, :8], batch_size=4
        )


# MONAI agreement.  MONAI steps by int(window * (1 - overlap)) and pulls only the last
# window back onto the border; we spread the windows evenly (nnU-Net).  The window
# counts are equal, and the positions coincide exactly when (size - window) is a
# multiple of the integer stride, so only such sizes are compared here.  (Elsewhere the
# results differ near window seams, by design.)  MONAI also pads images smaller than
# the window, which we refuse, so no such case is compared.
@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize(
    ("size", "window", "overlap"), [((56, 72), 16, 0.5), ((52, 40), 16, 0.25), ((28, 36), 16, 0.75)]
)
def test_matches_monai(weighting: str, size: tuple[int, int], window: int, overlap: float) -> None:
    monai_inferers = pytest.importorskip("monai.inferers", reason="monai is not installed")
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(2, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 3, padding=1)
    ).eval()
    x = torch.rand(2, 2, *size)
    ours = sliding_window_inference(x, window=window, overlap=overlap, predictor=net, weighting=weighting, batch_size=6)
    with torch.inference_mode():
        theirs = monai_inferers.sliding_window_inference(x, window, 6, net, overlap=overlap, mode=weighting)
    assert ours.shape == theirs.shape == (2, 3, *size)
    torch.testing.assert_close(ours, theirs.as_tensor() if hasattr(theirs, "as_tensor") else theirs, atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_cuda_device_from_cpu_inputs(weighting: str) -> None:
    x = torch.rand(2, 1, 37, 53)
    out = sliding_window_inference(
        x, window=16, overlap=0.5, predictor=lambda t: 2 * t + 1, weighting=weighting, device="cuda"
    )
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), 2 * x + 1, atol=1e-6, rtol=1e-6)
