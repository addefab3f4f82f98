"""Augmentation pipelines, built by one function each from params (albumentations).

Albumentations' randomness is controlled only by ``Compose(seed=...)`` (its
reproducibility guide: global seeds do not reach it), so every pipeline takes a seed
and the training loop re-seeds it per epoch, which makes a resumed run draw the same
augmentations as an uninterrupted one.  Image, label and FOV go through the same
transform; masks use nearest-neighbour interpolation.
"""

from __future__ import annotations

import albumentations as A
import cv2

import vesselseg  # noqa: F401  (sets NO_ALBUMENTATIONS_UPDATE before the import below)


def _compose(transforms: list[A.BasicTransform], seed: int) -> A.Compose:
    return A.Compose(transforms, additional_targets={"fov": "mask"}, seed=seed)


def offline_augmenter(*, rotate_limit: float, scale_limit: float, seed: int) -> A.Compose:
    """Rotation/scale/flip copies made once by the patches stage.

    Reflection at the borders instead of black corners: a black wedge would teach
    the net that vessels end at straight edges.
    """
    return _compose(
        [
            A.Affine(
                rotate=(-rotate_limit, rotate_limit),
                scale=(1.0 - scale_limit, 1.0 + scale_limit),
                border_mode=cv2.BORDER_REFLECT_101,
                p=1.0,
            ),
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
        ],
        seed,
    )


def online_augmenter(*, flip: bool, rotate90: bool, seed: int) -> A.Compose | None:
    """Cheap per-sample transforms applied by the training loader every epoch."""
    transforms: list[A.BasicTransform] = []
    if flip:
        transforms += [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    if rotate90:
        transforms.append(A.RandomRotate90(p=1.0))
    return _compose(transforms, seed) if transforms else None
