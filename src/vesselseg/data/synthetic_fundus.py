"""A small DRIVE-like colour fundus dataset, generated so the 2D pipeline runs offline.

Files follow DRIVE exactly (``training|test/images/NN_training.tif|NN_test.tif``,
``*/1st_manual/NN_manual1.gif``, ``*/mask/NN_<split>_mask.gif``), so the DRIVE adapter
reads them unchanged.  Ids are numbered as DRIVE numbers them: the test half first
(01..n_test), then the training half (n_test+1..n_images); 40 images give exactly
DRIVE's 01-20 test and 21-40 training.

Looks: a circular field of view (black outside), orange-red background with
vignetting, a bright optic disc and a darker macula, slow choroidal texture, a vessel
tree growing out of the disc (arcades above and below the macula), darker than the
background and most visible in the green channel (as in real fundus photographs,
where haemoglobin absorbs green most), slight optical blur and sensor noise.
Deterministic: one ``SeedSequence`` child per image; TIFF (tifffile) and GIF (PIL)
encoders write no timestamps.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import tifffile
from PIL import Image
from tqdm import tqdm

from vesselseg.atomic import atomic_dir
from vesselseg.data.vessel_tree import disc_origins, draw_vessel_tree
from vesselseg.errors import ParamsError

log = logging.getLogger(__name__)

__all__ = ["FundusImage", "default_width_range", "drive_ids", "generate_fundus_dataset", "synthesize_fundus"]

# Background reflectance (R, G, B) and how much a vessel axis darkens each channel.
_BACKGROUND = np.array([0.85, 0.38, 0.16], dtype=np.float32)
_VESSEL_CONTRAST = np.array([0.18, 0.55, 0.35], dtype=np.float32)
_DISC_COLOUR = np.array([0.15, 0.45, 0.30], dtype=np.float32)


@dataclass(frozen=True)
class FundusImage:
    """One generated image: ``rgb`` uint8 (H, W, 3), ``label`` and ``fov`` bool (H, W)."""

    rgb: np.ndarray
    label: np.ndarray
    fov: np.ndarray


def drive_ids(n_images: int) -> tuple[list[str], list[str]]:
    """``(test_ids, training_ids)``, numbered as DRIVE: test first, zero-padded to 2+ digits."""
    n_test = n_images // 2
    pad = max(2, len(str(n_images)))
    ids = [str(i + 1).zfill(pad) for i in range(n_images)]
    return ids[:n_test], ids[n_test:]


def default_width_range(size: int) -> tuple[float, float]:
    """1 to 8 px (DRIVE's calibres) from 256 px up; thinner trunks on smaller images."""
    return 1.0, float(np.clip(8.0 * size / 256, 3.0, 8.0))


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    field = cv2.GaussianBlur(
        rng.standard_normal(shape).astype(np.float32), (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT
    )
    peak = float(np.abs(field).max())
    return field / peak if peak > 0 else field


def synthesize_fundus(
    rng: np.random.Generator,
    *,
    size: int,
    width_range: tuple[float, float] | None = None,
    fov_fraction: float = 0.46,
    noise_std: float = 0.015,
    blur_sigma: float = 0.6,
) -> FundusImage:
    """Draw one fundus image of ``size`` x ``size`` px; the FOV radius is ``fov_fraction * size``.

    ``width_range`` (px) defaults to :func:`default_width_range`.  Larger images get more
    side branches (and one more generation), as a sharper photograph resolves more
    small vessels; this keeps the vessel fraction near DRIVE's (about 12% of the FOV).
    """
    if width_range is None:
        width_range = default_width_range(size)
    density = min(2.0, max(1.0, size / 256))
    c = (size - 1) / 2.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    radius = fov_fraction * size
    r2 = ((yy - c) ** 2 + (xx - c) ** 2) / radius**2
    fov = r2 <= 1.0

    side = 1.0 if rng.random() < 0.5 else -1.0  # right or left eye: disc right or left of the macula
    disc = (c + rng.uniform(-0.03, 0.03) * size, c + side * rng.uniform(0.25, 0.3) * size)
    temporal = math.atan2(0.0, -side)  # from the disc towards the macula
    arcade = rng.uniform(0.9, 1.25)
    nasal = rng.uniform(0.45, 0.8)
    angles = [temporal - arcade, temporal + arcade, temporal + math.pi - nasal, temporal + math.pi + nasal]
    # The arcades bend back towards the temporal direction, around the macula: about a
    # right angle over half the image.  ``temporal - arcade`` must turn up (+), the
    # other one down (-), for either eye.
    arc_turn = (math.pi / 2) / (0.5 * size)
    turns = [arc_turn, -arc_turn, 0.0, 0.0]
    tree = draw_vessel_tree(
        (size, size),
        rng,
        origins=disc_origins(disc, 0.035 * size, angles, rng, turns=turns),
        width_range=width_range,
        step=max(1.5, size / 128),
        branch_length=0.45,
        curvature=0.05,
        side_branch_prob=0.05 * density,
        max_generations=6 if density == 1.0 else 7,
        avoid=(c, c, 0.06 * size),
    )

    # Illumination: vignetting, a tilted gradient, slow texture; then disc and macula.
    tilt = rng.uniform(-0.1, 0.1, size=2).astype(np.float32)
    light = (1.0 - 0.45 * np.clip(r2, 0, 1.5) ** 1.25) * (1.0 + tilt[0] * (yy - c) / c + tilt[1] * (xx - c) / c)
    light *= 1.0 + 0.06 * _smooth_field(rng, (size, size), size / 24)
    disc_blob = np.exp(-(((yy - disc[0]) ** 2 + (xx - disc[1]) ** 2) / (2 * (0.045 * size) ** 2)))
    macula = 1.0 - 0.3 * np.exp(-(((yy - c) ** 2 + (xx - c) ** 2) / (2 * (0.07 * size) ** 2)))
    rgb = (_BACKGROUND[None, None, :] * (light * macula)[..., None]) + _DISC_COLOUR[None, None, :] * disc_blob[
        ..., None
    ]
    rgb *= 1.0 - _VESSEL_CONTRAST[None, None, :] * tree.intensity[..., None]
    if blur_sigma > 0:
        rgb = cv2.GaussianBlur(rgb, (0, 0), sigmaX=blur_sigma)
    rgb += rng.normal(0.0, noise_std, size=rgb.shape).astype(np.float32)
    rgb *= fov[..., None]
    out = np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
    return FundusImage(out, tree.label & fov, fov)


def _write_gif(path: Path, mask: np.ndarray) -> None:
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(path, format="GIF")


def generate_fundus_dataset(
    out_dir: Path,
    *,
    n_images: int,
    size: int,
    seed: int,
    width_range: tuple[float, float] | None = None,
    progress: bool | None = None,
) -> None:
    """Write the ``synthetic-fundus`` raw layout (DRIVE's) into ``out_dir``, replaced atomically.

    Half the images (rounded down) go to ``test``, the rest to ``training``.
    """
    out_dir = Path(out_dir)
    if n_images < 2:
        raise ParamsError(f"data.synthetic_fundus.n_images must be >= 2 (one per split), got {n_images}")
    if size < 32:
        raise ParamsError(f"data.synthetic_fundus.size must be >= 32, got {size}")
    test_ids, train_ids = drive_ids(n_images)
    jobs = [("test", i) for i in test_ids] + [("training", i) for i in train_ids]
    children = np.random.SeedSequence(seed).spawn(n_images)
    with atomic_dir(out_dir) as tmp:
        for split in ("training", "test"):
            for sub in ("images", "1st_manual", "mask"):
                (tmp / split / sub).mkdir(parents=True)
        for (split, id_), child in tqdm(
            list(zip(jobs, children, strict=True)),
            desc="synthetic fundus",
            unit="image",
            disable=None if progress is None else not progress,
        ):
            img = synthesize_fundus(np.random.default_rng(child), size=size, width_range=width_range)
            tifffile.imwrite(tmp / split / "images" / f"{id_}_{split}.tif", img.rgb, photometric="rgb")
            _write_gif(tmp / split / "1st_manual" / f"{id_}_manual1.gif", img.label)
            _write_gif(tmp / split / "mask" / f"{id_}_{split}_mask.gif", img.fov)
    log.info(
        "wrote %d synthetic fundus images (%d test, %d training) to %s",
        n_images,
        len(test_ids),
        len(train_ids),
        out_dir,
    )
