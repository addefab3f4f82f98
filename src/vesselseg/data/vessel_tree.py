"""Random branching vessel trees, drawn into a 2D intensity map and a binary label.

Both synthetic datasets (OCTA en-face plexus and colour fundus) need the same thing: a
tree of smooth, curvy vessels whose calibre shrinks from trunk to capillary, with a
ground-truth mask that matches the drawn pixels exactly.  Nothing in scikit-image or
OpenCV grows such trees, so the geometry is our own (a few dozen lines); the drawing
is OpenCV's (``cv2.line`` with round caps on a supersampled canvas, then an area
downsample), which gives anti-aliased sub-pixel widths at C speed.

Everything random is drawn from the ``np.random.Generator`` passed in, in a fixed
order, so equal seeds give byte-identical maps.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from vesselseg.errors import ParamsError

log = logging.getLogger(__name__)

__all__ = [
    "Origin",
    "VesselTree",
    "border_origins",
    "disc_origins",
    "draw_vessel_tree",
    "grow_segments",
    "render_segments",
]

# Cross-section of a cylindrical vessel: the path length through it at normalised
# distance r from the axis is sqrt(1 - r^2).  Four nested bands approximate it; the
# value of each band is the profile at the band's mid-radius.
_BAND_RADII = (1.0, 0.75, 0.5, 0.25)
_BAND_VALUES = tuple(
    math.sqrt(1.0 - ((r + r2) / 2.0) ** 2) for r, r2 in zip(_BAND_RADII, (*_BAND_RADII[1:], 0.0), strict=True)
)


@dataclass(frozen=True)
class Origin:
    """Where a trunk starts: position in pixels (row ``y``, column ``x``) and heading in radians.

    ``angle`` 0 points along +x (right), pi/2 along +y (down).  ``turn`` is a steady
    bend in radians per pixel of path (positive turns towards +angle), e.g. to make the
    retinal arcades curve around the macula; children inherit half of it.
    """

    y: float
    x: float
    angle: float
    turn: float = 0.0


@dataclass(frozen=True)
class VesselTree:
    """A drawn tree.

    ``intensity`` is float32 (H, W) in [0, 1]: 1 on the axis of a vessel, falling to 0 at
    its wall, anti-aliased; ``label`` is bool (H, W): pixels at least half covered by a
    vessel; ``n_segments`` counts the drawn line pieces (useful to spot a degenerate tree).
    """

    intensity: np.ndarray
    label: np.ndarray
    n_segments: int

    @property
    def vessel_fraction(self) -> float:
        return float(self.label.mean())


def border_origins(shape: tuple[int, int], n: int, rng: np.random.Generator, *, spread: float = 0.6) -> list[Origin]:
    """``n`` trunks entering from random points of the image border, heading inwards.

    The heading points at the centre, turned by up to ``spread`` radians either way, so
    trunks cross the field instead of hugging the edge (as the large arterioles of a
    macula-centred OCTA scan do).
    """
    h, w = shape
    out: list[Origin] = []
    perimeter = 2 * (h + w)
    for _ in range(n):
        t = rng.uniform(0, perimeter)
        if t < w:
            y, x = 0.0, t
        elif t < w + h:
            y, x = t - w, w - 1.0
        elif t < 2 * w + h:
            y, x = h - 1.0, t - w - h
        else:
            y, x = t - 2 * w - h, 0.0
        towards_centre = math.atan2((h - 1) / 2 - y, (w - 1) / 2 - x)
        out.append(Origin(y, x, towards_centre + rng.uniform(-spread, spread)))
    return out


def disc_origins(
    centre: tuple[float, float],
    radius: float,
    angles: Sequence[float],
    rng: np.random.Generator,
    *,
    turns: Sequence[float] | None = None,
    jitter: float = 0.15,
) -> list[Origin]:
    """Trunks leaving an optic-disc-like circle at the given headings (radians, jittered).

    ``turns`` gives each trunk's steady bend (see :class:`Origin`); default straight-ish.
    """
    cy, cx = centre
    turns = [0.0] * len(angles) if turns is None else list(turns)
    if len(turns) != len(angles):
        raise ParamsError(f"disc_origins: {len(angles)} angles but {len(turns)} turns")
    out: list[Origin] = []
    for a, t in zip(angles, turns, strict=True):
        a = a + rng.uniform(-jitter, jitter)
        out.append(Origin(cy + radius * math.sin(a), cx + radius * math.cos(a), a, t))
    return out


def _check_params(width_range: tuple[float, float], step: float, branch_length: float, max_generations: int) -> None:
    lo, hi = width_range
    if not 0 < lo <= hi:
        raise ParamsError(f"width_range {list(width_range)} must satisfy 0 < min <= max")
    if step <= 0 or branch_length <= 0:
        raise ParamsError(f"step ({step}) and branch_length ({branch_length}) must be > 0")
    if max_generations < 0:
        raise ParamsError(f"max_generations must be >= 0, got {max_generations}")


def grow_segments(
    shape: tuple[int, int],
    rng: np.random.Generator,
    *,
    origins: Sequence[Origin],
    width_range: tuple[float, float] = (1.0, 8.0),
    step: float = 3.0,
    branch_length: float = 0.35,
    curvature: float = 0.06,
    side_branch_prob: float = 0.04,
    branch_angle: tuple[float, float] = (0.35, 0.8),
    taper: float = 0.25,
    max_generations: int = 6,
    avoid: tuple[float, float, float] | None = None,
    max_segments: int = 50_000,
) -> np.ndarray:
    """Grow the tree's geometry: rows of ``(x0, y0, x1, y1, width)`` in pixels, float64.

    Each branch walks in steps of ``step`` px; its heading changes by a smoothed random
    turn rate (``curvature`` rad per step, low-pass filtered so paths curve instead of
    jitter).  Its width tapers by ``taper`` over its length, which is ``branch_length``
    times the image size, scaled by its calibre (thick trunks run further).  Along the way
    it sheds thinner side branches (probability ``side_branch_prob`` per step) and at its
    end it bifurcates; child calibres follow Murray's law (w^3 = w1^3 + w2^3), as real
    vascular trees do.  Branches thinner than ``width_range[0]`` or deeper than
    ``max_generations`` are not grown; a branch stops when it leaves the image or
    enters the ``avoid`` circle ``(y, x, r)`` (a foveal avascular zone).
    """
    _check_params(width_range, step, branch_length, max_generations)
    h, w = shape
    w_min, w_max = width_range
    size = math.sqrt(h * w)
    margin = w_max
    segs: list[tuple[float, float, float, float, float]] = []
    # (y, x, angle, width, generation, bend); a list used as a stack keeps the order fixed.
    stack: list[tuple[float, float, float, float, int, float]] = [
        (o.y, o.x, o.angle, w_max * rng.uniform(0.75, 1.0), 0, o.turn) for o in reversed(list(origins))
    ]
    while stack and len(segs) < max_segments:
        y, x, angle, width, gen, bend = stack.pop()
        length = branch_length * size * rng.uniform(0.6, 1.4) * math.sqrt(width / w_max)
        n_steps = max(2, int(length / step))
        turn = 0.0
        stopped = False
        for s in range(n_steps):
            turn = 0.7 * turn + rng.normal(0.0, curvature)
            angle += turn + bend * step
            ny, nx = y + step * math.sin(angle), x + step * math.cos(angle)
            wid = width * (1.0 - taper * s / n_steps)
            segs.append((x, y, nx, ny, wid))
            y, x = ny, nx
            if not (-margin <= y <= h + margin and -margin <= x <= w + margin):
                stopped = True
                break
            if avoid is not None and (y - avoid[0]) ** 2 + (x - avoid[1]) ** 2 < avoid[2] ** 2:
                stopped = True
                break
            if gen < max_generations and rng.random() < side_branch_prob:
                child = wid * rng.uniform(0.35, 0.7)
                if child >= w_min:
                    side = 1.0 if rng.random() < 0.5 else -1.0
                    stack.append((y, x, angle + side * rng.uniform(0.8, 1.4), child, gen + 1, bend / 2))
                    width = (max(wid**3 - child**3, w_min**3)) ** (1.0 / 3.0) / (1.0 - taper * s / n_steps)
        if stopped or gen >= max_generations:
            continue
        end_w = width * (1.0 - taper)
        ratio = rng.uniform(0.5, 1.0)
        w1 = end_w / (1.0 + ratio**3) ** (1.0 / 3.0)
        w2 = ratio * w1
        spread_a = rng.uniform(*branch_angle)
        spread_b = rng.uniform(*branch_angle)
        for child_w, child_a in ((w1, angle - spread_a), (w2, angle + spread_b)):
            if child_w >= w_min:
                stack.append((y, x, child_a, child_w, gen + 1, bend / 2))
    if len(segs) >= max_segments:
        log.warning("vessel tree stopped at max_segments=%d; the tree may be lopsided", max_segments)
    return np.asarray(segs, dtype=np.float64).reshape(-1, 5)


def render_segments(
    segments: np.ndarray, shape: tuple[int, int], *, supersample: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Draw segments into ``(intensity float32 [0, 1], label bool)`` maps of ``shape``.

    Lines are drawn on a canvas ``supersample`` times larger, band by band from the
    vessel wall inwards, so a brighter inner band always overwrites a dimmer outer one
    (a max-composite where vessels cross) with no per-pixel Python.  ``INTER_AREA``
    downsampling then turns the canvas into anti-aliased intensities and coverage.
    """
    if supersample < 1:
        raise ParamsError(f"supersample must be >= 1, got {supersample}")
    h, w = shape
    ss = supersample
    canvas = np.zeros((h * ss, w * ss), dtype=np.uint8)
    pts = np.rint(segments[:, :4] * ss + (ss - 1) / 2.0).astype(np.int64)
    for radius, value in zip(_BAND_RADII, _BAND_VALUES, strict=True):
        colour = round(255 * value)
        thick = np.maximum(1, np.rint(segments[:, 4] * ss * radius)).astype(np.int64)
        for (x0, y0, x1, y1), t in zip(pts.tolist(), thick.tolist(), strict=True):
            cv2.line(canvas, (x0, y0), (x1, y1), colour, t, cv2.LINE_8)
    intensity = cv2.resize(canvas.astype(np.float32) * np.float32(1 / 255), (w, h), interpolation=cv2.INTER_AREA)
    coverage = cv2.resize((canvas > 0).astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
    return np.clip(intensity, 0.0, 1.0), coverage >= 0.5


def draw_vessel_tree(
    shape: tuple[int, int],
    rng: np.random.Generator,
    *,
    origins: Sequence[Origin],
    width_range: tuple[float, float] = (1.0, 8.0),
    step: float = 3.0,
    branch_length: float = 0.35,
    curvature: float = 0.06,
    side_branch_prob: float = 0.04,
    branch_angle: tuple[float, float] = (0.35, 0.8),
    taper: float = 0.25,
    max_generations: int = 6,
    avoid: tuple[float, float, float] | None = None,
    supersample: int = 4,
) -> VesselTree:
    """Grow and draw one tree; see :func:`grow_segments` for the geometry knobs."""
    segs = grow_segments(
        shape,
        rng,
        origins=origins,
        width_range=width_range,
        step=step,
        branch_length=branch_length,
        curvature=curvature,
        side_branch_prob=side_branch_prob,
        branch_angle=branch_angle,
        taper=taper,
        max_generations=max_generations,
        avoid=avoid,
    )
    intensity, label = render_segments(segs, shape, supersample=supersample)
    return VesselTree(intensity=intensity, label=label, n_segments=len(segs))
