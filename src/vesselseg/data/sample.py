"""What a dataset adapter hands to the prepare stage: one record per subject."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Split = Literal["train", "val", "test"]


@dataclass(frozen=True)
class RawSample:
    """One subject of a raw dataset, as files on disk.

    Exactly one of ``image`` (a 2D image file) and ``volume`` (a folder of B-scan
    slices, OCTA-500 style) is set.  ``split`` is the dataset's official split when it
    has one; ``None`` lets the prepare stage draw a seeded split.  ``group`` keeps
    slices of one patient in one split (LGG MRI): split by group, never by sample.
    """

    id: str
    label: Path
    image: Path | None = None
    volume: Path | None = None
    fov: Path | None = None
    split: Split | None = None
    group: str | None = None

    def __post_init__(self) -> None:
        if (self.image is None) == (self.volume is None):
            raise ValueError(f"sample {self.id}: exactly one of image and volume must be set")
