"""Classical baselines: k-NN on 3x3 neighbourhoods and Frangi vesselness."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import f1_score, roc_auc_score

from vesselseg.errors import DataError, ParamsError
from vesselseg.families.knn import fit_knn, neighbourhood_features, predict_proba_image, sample_training_pixels
from vesselseg.families.vesselness import choose_threshold, frangi_vesselness

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def _line_image(rng: np.random.Generator, size: int = 48, bright: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Noisy background with a 2-px line (bright or dark) and a 1-px line; returns (image, label)."""
    label = np.zeros((size, size), bool)
    r = int(rng.integers(10, size - 12))
    label[r : r + 2, 4:-4] = True
    c = int(rng.integers(8, size - 8))
    label[6:-6, c] = True
    base, vessel = (70.0, 190.0) if bright else (170.0, 60.0)
    image = np.where(label, vessel, base) + rng.normal(0, 18, label.shape)
    return np.clip(image, 0, 255).astype(np.uint8), label


# -- k-NN ----------------------------------------------------------------------


def test_neighbourhood_features_layout() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    f = neighbourhood_features(image)
    assert f.shape == (35, 9) and f.dtype == np.float32
    np.testing.assert_allclose(f[:, 4], image.ravel() / 255.0)
    i, j = 2, 3  # interior pixel: its plain 3x3 window, row-major
    np.testing.assert_allclose(f[i * 7 + j], image[i - 1 : i + 2, j - 1 : j + 2].ravel() / 255.0)
    # corner (0, 0) with mirrored borders: rows/cols (1, 0, 1)
    expected = image[np.ix_([1, 0, 1], [1, 0, 1])].ravel() / 255.0
    np.testing.assert_allclose(f[0], expected)
    with pytest.raises(DataError, match="uint8"):
        neighbourhood_features(image.astype(np.float32))


def test_sample_training_pixels_keeps_vessels_and_their_surroundings() -> None:
    size = 60
    label = np.zeros((size, size), bool)
    label[30, 10:50] = True
    fov = np.zeros((size, size), bool)
    fov[5:55, 5:55] = True
    # brute-force Euclidean distance to the nearest vessel pixel
    yy, xx = np.mgrid[:size, :size]
    vy, vx = np.nonzero(label)
    dist = np.sqrt((yy[..., None] - vy) ** 2 + (xx[..., None] - vx) ** 2).min(axis=-1)
    near = ~label & (dist <= 3)
    far = ~label & (dist > 3)
    # the centre feature tells which category a sampled pixel came from
    image = np.where(label, 250, np.where(near, 50, 150)).astype(np.uint8)
    X, y = sample_training_pixels(
        [image], [label], [fov], background_keep=0.3, near_vessel_px=3, max_pixels=None, rng=1
    )
    centre = np.rint(X[:, 4] * 255).astype(int)
    assert int(y.sum()) == int(label.sum()) == int(np.sum(centre == 250))
    assert int(np.sum(centre == 50)) == int((near & fov).sum())
    kept_far = int(np.sum(centre == 150))
    assert 0.25 * (far & fov).sum() < kept_far < 0.35 * (far & fov).sum()
    assert X.shape == (len(y), 9)

    # pixels outside the FOV are never used: mark them with a unique intensity
    image2 = image.copy()
    image2[~fov] = 7
    X2, _ = sample_training_pixels([image2], [label], [fov], background_keep=1.0, max_pixels=None, rng=0)
    assert not np.any(np.isclose(X2[:, 4], 7 / 255.0))
    assert len(X2) == int(fov.sum())

    X3, y3 = sample_training_pixels([image], [label], [fov], max_pixels=100, rng=0)
    assert len(y3) == 100 and len(X3) == 100

    with pytest.raises(ParamsError, match="background_keep"):
        sample_training_pixels([image], [label], [fov], background_keep=1.5, rng=0)
    with pytest.raises(DataError, match="shape"):
        sample_training_pixels([image], [label[:10]], None, rng=0)


def test_knn_beats_chance_on_lines() -> None:
    rng = np.random.default_rng(0)
    train = [_line_image(rng) for _ in range(3)]
    X, y = sample_training_pixels([t[0] for t in train], [t[1] for t in train], None, max_pixels=3000, rng=rng)
    model, best_k = fit_knn(X, y, k_grid=(3, 7), cv=3, seed=0)
    assert best_k in (3, 7)
    image, label = _line_image(rng)
    prob = predict_proba_image(model, image)
    assert prob.shape == image.shape and prob.dtype == np.float32
    assert prob.min() >= 0.0 and prob.max() <= 1.0
    auc = roc_auc_score(label.ravel(), prob.ravel())
    f1 = f1_score(label.ravel(), prob.ravel() >= 0.5)
    chance_f1 = 2 * label.mean() / (1 + label.mean())  # predicting "vessel" everywhere
    assert auc > 0.9
    assert f1 > 2 * chance_f1

    fov = np.zeros(image.shape, bool)
    fov[:, : image.shape[1] // 2] = True
    masked = predict_proba_image(model, image, fov)
    assert np.all(masked[~fov] == 0)
    np.testing.assert_array_equal(masked[fov], prob[fov])


def test_fit_knn_errors() -> None:
    X = np.random.default_rng(0).random((30, 9), dtype=np.float32)
    with pytest.raises(DataError, match="only class"):
        fit_knn(X, np.zeros(30, np.uint8))
    y = np.array([0, 1] * 15, np.uint8)
    with pytest.raises(ParamsError, match="k_grid"):
        fit_knn(X, y, k_grid=(100,))


# -- Frangi ----------------------------------------------------------------------


@pytest.mark.parametrize("bright", [True, False])
def test_frangi_responds_to_lines(bright: bool) -> None:
    rng = np.random.default_rng(3)
    image, label = _line_image(rng, size=64, bright=bright)
    v = frangi_vesselness(image, black_ridges=not bright)
    assert v.shape == image.shape and v.dtype == np.float32
    assert v.min() >= 0.0 and v.max() <= 1.0
    assert v[label].mean() > 5 * v[~label].mean()
    assert roc_auc_score(label.ravel(), v.ravel()) > 0.9
    # the wrong polarity sees the line as background
    wrong = frangi_vesselness(image, black_ridges=bright)
    assert wrong[label].mean() < v[label].mean() / 3


def test_frangi_ignores_the_fov_rim() -> None:
    rng = np.random.default_rng(4)
    image, label = _line_image(rng, size=64, bright=False)
    yy, xx = np.mgrid[:64, :64]
    fov = (yy - 32) ** 2 + (xx - 32) ** 2 < 30**2
    image[~fov] = 0  # black outside, like a fundus photograph
    v = frangi_vesselness(image, fov, black_ridges=True)
    assert np.all(v[~fov] == 0)
    rim = fov & ((yy - 32) ** 2 + (xx - 32) ** 2 > 27**2) & ~label
    assert v[rim].mean() < 0.5 * v[label & fov].mean()


def test_choose_threshold_matches_brute_force() -> None:
    rng = np.random.default_rng(5)
    probs, labels, fovs = [], [], []
    grid = np.linspace(0, 1, 51)
    for _ in range(3):
        lab = rng.random((20, 30)) < 0.15
        # scores exactly on grid values, so ">=" versus ">" at a threshold matters
        p = grid[np.clip(15 * lab + rng.integers(0, 36, lab.shape), 0, 50)]
        fov = rng.random(lab.shape) < 0.8
        probs.append(p), labels.append(lab), fovs.append(fov)
    t = choose_threshold(probs, labels, fovs, n_thresholds=51)
    P = np.concatenate([p[f] for p, f in zip(probs, fovs, strict=True)])
    L = np.concatenate([lab[f] for lab, f in zip(labels, fovs, strict=True)])

    def dice(th: float) -> float:
        pred = th <= P
        return 2 * np.sum(pred & L) / (pred.sum() + L.sum())

    candidates = np.unique(np.concatenate([grid, np.quantile(P, grid)]))
    best = max(dice(th) for th in candidates)
    assert dice(t) == pytest.approx(best)
    assert dice(t) >= max(dice(th) for th in grid)
    with pytest.raises(DataError, match="shapes differ"):
        choose_threshold([probs[0]], [labels[1][:5]], None)


def test_frangi_on_drive() -> None:
    drive = SHARED / "DRIVE" / "training"
    if not drive.is_dir():
        pytest.skip(f"real-data check needs {drive} (read-only shared datasets are absent)")
    green = np.array(Image.open(drive / "images" / "21_training.tif"))[..., 1]
    label = np.array(Image.open(drive / "1st_manual" / "21_manual1.gif")) > 0
    fov = np.array(Image.open(drive / "mask" / "21_training_mask.gif")) > 0
    v = frangi_vesselness(green, fov, black_ridges=True)
    auc = roc_auc_score(label[fov], v[fov])
    assert auc > 0.85, auc  # published Frangi results on DRIVE: AUC 0.88-0.95
    wrong = frangi_vesselness(green, fov, black_ridges=False)
    assert roc_auc_score(label[fov], wrong[fov]) < 0.5
