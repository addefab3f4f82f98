"""A small OCTA-500-like dataset of B-scan volumes, generated so the pipeline runs offline.

Each subject is a folder of 8-bit BMP B-scans ``OCTA/<subject>/1.bmp .. N.bmp`` of
shape (depth, width) and an en-face label ``GT/<subject>.bmp`` of shape
(width, n_bscans), oriented as OCTA-500 is read (column j of the en-face map comes from
B-scan j).

What makes it a fair test of the pipeline rather than a toy:

- the labelled (superficial) vessels carry flow signal only inside the depth ``slab``;
  a second, finer *deep plexus* lies below (or above) the slab and is not labelled,
  so a full-depth projection shows both trees and a plain threshold cannot tell
  them apart, while a slab projection isolates the labelled one;
- the background is a layered, gently curved retina with per-A-scan gain (shadowing)
  and multiplicative speckle, so a projection is noisy and unevenly lit;
- vessel depth extent follows a cylinder (thicker in depth at the vessel axis), so
  the en-face contrast fades towards the vessel wall as in real data.

Determinism: one ``SeedSequence`` child per subject, all draws from its Generator in a
fixed order, and BMP encoding by OpenCV (no timestamps), so the same arguments give
byte-identical files.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from vesselseg.atomic import atomic_dir
from vesselseg.data.vessel_tree import border_origins, draw_vessel_tree
from vesselseg.errors import DataError, ParamsError

log = logging.getLogger(__name__)

__all__ = ["default_vessel_widths", "generate_octa_dataset", "subject_ids", "synthesize_subject"]

# Retina layers below the inner limiting membrane, as (top edge as a fraction of the
# retina thickness, reflectivity).  Rough OCT look: bright NFL, grey plexiform
# layers, dark nuclear layers, bright photoreceptor/RPE band, textured choroid.
_LAYERS = (
    (0.00, 0.42),  # nerve fibre layer
    (0.12, 0.30),  # ganglion cell + inner plexiform layers
    (0.35, 0.18),  # inner nuclear layer
    (0.47, 0.30),  # outer plexiform layer
    (0.55, 0.14),  # outer nuclear layer
    (0.78, 0.50),  # photoreceptors / RPE
    (0.88, 0.26),  # choroid
)


def subject_ids(n_subjects: int) -> list[str]:
    """OCTA-500-style five-digit ids (10001, 10002, ...): they sort the same as text and naturally."""
    return [str(10001 + i) for i in range(n_subjects)]


def default_vessel_widths(enface: tuple[int, int]) -> tuple[float, float]:
    """Calibres in proportion to the field: 1 to 4.5 px at 128 px, so the vessel
    fraction (about 10-18%) does not depend on the en-face size."""
    return 1.0, max(2.0, 4.5 * min(enface) / 128.0)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: blurred white noise, rescaled."""
    field = cv2.GaussianBlur(
        rng.standard_normal(shape).astype(np.float32), (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT
    )
    peak = float(np.abs(field).max())
    return field / peak if peak > 0 else field


def _background(rng: np.random.Generator, n_bscans: int, depth: int, width: int, slab: tuple[int, int]) -> np.ndarray:
    """Layered retina (n_bscans, depth, width) float32; the surface bends by a few rows.

    The inner limiting membrane sits a little above the slab, so the slab falls in the
    inner retina (where the superficial plexus lives), whatever the depth.
    """
    top = max(0.0, slab[0] - 0.15 * depth)
    thickness = max(8.0, min(depth - top, 0.75 * depth))
    jj, xx = np.meshgrid(np.linspace(-1, 1, n_bscans), np.linspace(-1, 1, width), indexing="ij")
    bend = 0.02 * depth * (xx**2 + jj**2) + 0.01 * depth * _smooth_field(rng, (n_bscans, width), 8.0)
    surface = (top + bend).astype(np.float32)  # (n_bscans, width)
    u = np.arange(depth, dtype=np.float32)[None, :, None] - surface[:, None, :]
    edges = [0.0] + [f * thickness for f, _ in _LAYERS]
    values = [0.04] + [v for _, v in _LAYERS]
    # np.interp between consecutive band edges gives soft 1-2 row transitions.
    xp, fp = [-1.5], [0.04]
    for i in range(1, len(edges)):
        xp += [edges[i] - 0.75, edges[i] + 0.75]
        fp += [values[i - 1], values[i]]
    return np.interp(u, xp, fp).astype(np.float32)


def _add_flow(vol: np.ndarray, vessels: np.ndarray, band: tuple[int, int], amplitude: float) -> None:
    """Add the flow signal of an en-face vessel map (width, n_bscans) to ``vol`` in place.

    A vessel is a cylinder centred in ``band``: at en-face profile value v (1 on the axis)
    it spans ``v`` times the band's half-height in depth, with a one-row soft edge, and
    nothing outside ``band`` (only the band's rows are touched).
    """
    b0, b1 = band
    centre = (b0 + b1 - 1) / 2.0
    half = np.float32((b1 - b0) / 2.0)
    d = np.abs(np.arange(b0, b1, dtype=np.float32) - np.float32(centre))[None, :, None]
    v = np.where(vessels > 0.02, vessels, 0.0).T[:, None, :].astype(np.float32)
    signal = np.clip(half * v - d + np.float32(0.5), 0.0, 1.0)
    signal *= v > 0
    vol[:, b0:b1, :] += np.float32(amplitude) * signal


@functools.lru_cache(maxsize=8)
def _speckle_lut(looks: int, levels: int = 4096) -> np.ndarray:
    """Quantiles of gamma(looks)/looks (mean 1) at ``levels`` evenly spaced probabilities.

    Indexing this table with uniform random integers samples the speckle distribution
    (to 1/4096 in probability) about 3x faster than drawing gamma variates.  For an
    integer shape k the gamma CDF is closed-form, 1 - exp(-x) * sum_{i<k} x^i / i!, so
    bisection inverts it without scipy.
    """
    p = (np.arange(levels, dtype=np.float64) + 0.5) / levels
    powers = np.arange(looks, dtype=np.float64)
    factorials = np.cumprod(np.concatenate([[1.0], np.arange(1.0, looks)]))
    lo, hi = np.zeros(levels), np.full(levels, 40.0 + 10.0 * looks)
    for _ in range(60):
        mid = (lo + hi) / 2
        cdf = 1.0 - np.exp(-mid) * (mid[:, None] ** powers / factorials).sum(axis=1)
        below = cdf < p
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return ((lo + hi) / (2.0 * looks)).astype(np.float32)


def _deep_band(depth: int, slab: tuple[int, int]) -> tuple[int, int] | None:
    """Where the unlabelled deep plexus goes: below the slab if there is room, else above."""
    s0, s1 = slab
    height = max(3, (3 * (s1 - s0)) // 4)
    gap = max(2, (s1 - s0) // 8)
    if s1 + gap + height <= depth:
        return s1 + gap, s1 + gap + height
    if s0 - gap - height >= 0:
        return s0 - gap - height, s0 - gap
    return None


def synthesize_subject(
    rng: np.random.Generator,
    *,
    n_bscans: int,
    depth: int,
    width: int,
    slab: tuple[int, int],
    vessel_widths: tuple[float, float] | None = None,
    flow_amplitude: float = 0.55,
    deep_plexus: bool = True,
    speckle_looks: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """One subject: ``(volume uint8 (n_bscans, depth, width), label bool (width, n_bscans))``.

    ``vessel_widths`` is the en-face calibre range in pixels (``None``: scaled to the
    en-face size, see :func:`default_vessel_widths`).

    Speckle is multiplicative with mean 1, gamma-distributed as the average of
    ``speckle_looks`` independent looks (std ``1/sqrt(looks)``; 1 look is fully
    developed speckle).
    """
    if int(speckle_looks) != speckle_looks or speckle_looks < 1:
        raise ParamsError(f"speckle_looks must be an integer >= 1, got {speckle_looks}")
    enface = (width, n_bscans)
    if vessel_widths is None:
        vessel_widths = default_vessel_widths(enface)
    faz = (width / 2.0, n_bscans / 2.0, 0.08 * min(enface))
    tree = draw_vessel_tree(
        enface,
        rng,
        origins=border_origins(enface, 4, rng),
        width_range=vessel_widths,
        step=2.0,
        branch_length=0.5,
        side_branch_prob=0.06,
        avoid=faz,
    )
    vol = _background(rng, n_bscans, depth, width, slab)
    _add_flow(vol, tree.intensity, slab, flow_amplitude)
    band = _deep_band(depth, slab) if deep_plexus else None
    if band is not None:
        deep = draw_vessel_tree(
            enface,
            rng,
            origins=border_origins(enface, 7, rng),
            width_range=(1.0, max(1.0, 0.75 * vessel_widths[1])),
            step=2.0,
            branch_length=0.4,
            side_branch_prob=0.1,
            curvature=0.12,
            avoid=faz,
        )
        _add_flow(vol, deep.intensity, band, flow_amplitude)
    # Shadowing / signal strength varies smoothly from A-scan to A-scan.
    gain = 0.8 + 0.2 * _smooth_field(rng, (n_bscans, width), 6.0)
    vol *= gain[:, None, :]
    lut = _speckle_lut(speckle_looks) * np.float32(255.0 / 1.6)  # speckle and the 8-bit scale in one table
    vol *= lut[rng.integers(0, lut.size, size=vol.shape, dtype=np.uint16)]
    out = np.clip(vol, 0, 255).astype(np.uint8)
    return out, tree.label


def _write_bmp(path: Path, array: np.ndarray) -> None:
    ok, buf = cv2.imencode(".bmp", np.ascontiguousarray(array))
    if not ok:
        raise DataError(f"{path}: could not encode BMP for array {array.shape} {array.dtype}")
    buf.tofile(path)


def _check(n_subjects: int, n_bscans: int, depth: int, width: int, slab: tuple[int, int]) -> None:
    if n_subjects < 1:
        raise ParamsError(f"data.synthetic.n_subjects must be >= 1, got {n_subjects}")
    for name, value in (("n_bscans", n_bscans), ("depth", depth), ("width", width)):
        if value < 8:
            raise ParamsError(f"data.synthetic.{name} must be >= 8, got {value}")
    s0, s1 = slab
    if not 0 <= s0 < s1 <= depth or s1 - s0 < 2:
        raise ParamsError(f"data.synthetic.slab [{s0}, {s1}) must satisfy 0 <= start < stop <= depth={depth}, 2+ rows")


def generate_octa_dataset(
    out_dir: Path,
    *,
    n_subjects: int,
    n_bscans: int,
    depth: int,
    width: int,
    slab: tuple[int, int],
    seed: int,
    vessel_widths: tuple[float, float] | None = None,
    flow_amplitude: float = 0.55,
    deep_plexus: bool = True,
    speckle_looks: int = 2,
    progress: bool | None = None,
) -> list[str]:
    """Write the ``synthetic`` raw layout into ``out_dir`` (replaced atomically); return subject ids.

    The whole folder is built under a temporary name and swapped in at the end, so a
    killed run never leaves a half-written dataset for DVC to cache.  ``progress`` is
    tqdm's ``disable`` negated: ``None`` shows a bar only on a terminal.
    """
    out_dir = Path(out_dir)
    slab = (int(slab[0]), int(slab[1]))
    _check(n_subjects, n_bscans, depth, width, slab)
    ids = subject_ids(n_subjects)
    children = np.random.SeedSequence(seed).spawn(n_subjects)
    with atomic_dir(out_dir) as tmp:
        (tmp / "GT").mkdir()
        for sid, child in tqdm(
            list(zip(ids, children, strict=True)),
            desc="synthetic OCTA",
            unit="subject",
            disable=None if progress is None else not progress,
        ):
            volume, label = synthesize_subject(
                np.random.default_rng(child),
                n_bscans=n_bscans,
                depth=depth,
                width=width,
                slab=slab,
                vessel_widths=vessel_widths,
                flow_amplitude=flow_amplitude,
                deep_plexus=deep_plexus,
                speckle_looks=speckle_looks,
            )
            folder = tmp / "OCTA" / sid
            folder.mkdir(parents=True)
            for k in range(n_bscans):
                _write_bmp(folder / f"{k + 1}.bmp", volume[k])
            _write_bmp(tmp / "GT" / f"{sid}.bmp", label.astype(np.uint8) * 255)
    log.info(
        "wrote %d synthetic OCTA subjects (%d B-scans of %dx%d) to %s", n_subjects, n_bscans, depth, width, out_dir
    )
    return ids
