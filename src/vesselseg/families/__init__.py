"""Model families: one module per kind of model, chosen by ``model.name`` through the registry.

A *family* owns how one kind of model is built, trained and predicted, in one
module (nnU-Net's trainer classes chosen by name, as hooks rather than copies):

=============== =============================== ==========================================
``model.name``   module                          trained on / predicts
=============== =============================== ==========================================
``unet``         :mod:`vesselseg.families.unet`          patches / whole images, sliding windows
``ipn``          :mod:`vesselseg.families.ipn`           volume blocks / stitched volumes
``resnet_patch`` :mod:`vesselseg.families.resnet_patch`  patch centres / a grid of centres
``knn``          :mod:`vesselseg.families.knn`           training pixels, fitted once
``vesselness``   :mod:`vesselseg.families.vesselness`    a threshold chosen on validation images
=============== =============================== ==========================================

The names, modules and schema facts live in :mod:`vesselseg.registry` (no torch, read
by the params schema); this package holds the families' code, loaded on demand by
:func:`get_family`.

Adding a family = one module under ``vesselseg/families/`` that defines ``FAMILY``
(an instance of :class:`vesselseg.families.base.Family`) plus one line in
:data:`vesselseg.registry.FAMILIES`.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vesselseg.errors import DataError
from vesselseg.registry import FAMILIES, info

if TYPE_CHECKING:
    from vesselseg.families.base import Family
    from vesselseg.params import ModelParams

__all__ = ["family_of_model_file", "get_family", "network_config"]


def get_family(name: str) -> Family:
    """The family object that trains and predicts ``model.name`` (its module imported on demand)."""
    module = importlib.import_module(info(name).module)
    return module.FAMILY


def family_of_model_file(path: Path | str) -> Family:
    """The family that wrote a model file: predict reads this from the file, never from params.yaml."""
    from vesselseg.models import model_kind

    name = model_kind(path)
    if name not in FAMILIES:
        raise DataError(f"{path}: holds a {name!r} model, which no family of this vesselseg version knows")
    return get_family(name)


def network_config(model: ModelParams) -> dict[str, Any]:
    """The constructor keywords of ``model.name``'s network (what its model file stores)."""
    family = get_family(model.name)
    if not family.info.neural:
        from vesselseg.errors import ParamsError

        raise ParamsError(f"model.name: {model.name!r} is not a neural network")
    return family.network_config(model)  # type: ignore[attr-defined]
