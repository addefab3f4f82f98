"""The prepared layout every dataset is mapped onto, and its reader.

``data/prepared/`` holds::

    images/<id>.png   uint8 grey (H, W) or RGB (H, W, 3), already projected/equalized
    labels/<id>.png   {0, 255}
    fov/<id>.png      {0, 255}; all 255 where the dataset has no field of view
    native/{labels,fov}/<id>.png, native_sizes.json
                      only for images prepare resized: their native label and FOV
    split.json        {"train": [ids], "val": [ids], "test": [ids], "dataset": name}

Downstream stages only see this layout, so they never know which dataset they run on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vesselseg import imagefiles
from vesselseg.errors import DataError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Item:
    id: str
    image: np.ndarray  # uint8 (H, W) or (H, W, 3)
    label: np.ndarray  # bool (H, W)
    fov: np.ndarray  # bool (H, W)


class PreparedDataset:
    """Read-only access to ``data/prepared``; loads images lazily, one at a time."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        split_file = self.root / "split.json"
        if not split_file.is_file():
            raise DataError(f"{split_file}: not found; run the prepare stage first")
        try:
            self.meta = json.loads(split_file.read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"{split_file}: malformed JSON ({err})") from None
        for split in SPLITS:
            if not isinstance(self.meta.get(split), list):
                raise DataError(f"{split_file}: missing list of ids for split '{split}'")

    def ids(self, split: str) -> list[str]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return list(self.meta[split])

    def paths(self, id_: str) -> tuple[Path, Path, Path]:
        return (
            self.root / "images" / f"{id_}.png",
            self.root / "labels" / f"{id_}.png",
            self.root / "fov" / f"{id_}.png",
        )

    def load(self, id_: str) -> Item:
        img_p, lab_p, fov_p = self.paths(id_)
        image = imagefiles.read_image(img_p)
        shape = image.shape[:2]
        return Item(
            id_, image, imagefiles.read_mask(lab_p, shape, "label"), imagefiles.read_mask(fov_p, shape, "FOV mask")
        )

    def items(self, split: str) -> list[Item]:
        return [self.load(i) for i in self.ids(split)]

    def native(self, id_: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The native-resolution ``(label, FOV)`` the prepare stage kept for a resized image, else None.

        A dataset prepared with ``prepare.fov_diameter`` or ``prepare.scale`` is scored
        at its native resolution (the published protocol): predictions are mapped back
        to this label's size.
        """
        lab = self.root / "native" / "labels" / f"{id_}.png"
        if not lab.is_file():
            return None
        label = imagefiles.read_mask(lab)
        return label, imagefiles.read_mask(self.root / "native" / "fov" / f"{id_}.png", label.shape, "FOV mask")


def write_item(root: Path, id_: str, image: np.ndarray, label: np.ndarray, fov: np.ndarray) -> None:
    imagefiles.write_png(root / "images" / f"{id_}.png", image)
    imagefiles.write_png(root / "labels" / f"{id_}.png", label.astype(bool))
    imagefiles.write_png(root / "fov" / f"{id_}.png", fov.astype(bool))
