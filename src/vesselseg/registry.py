"""The registry of model families: the one place that maps ``model.name`` to code.

Each line of :data:`FAMILIES` names a family, the module that owns how it is built,
trained and predicted (:mod:`vesselseg.families`), its torch network, and the facts the
params schema needs to check the rules that tie ``model`` to other sections.  This
module imports no family code (and no torch): the schema reads it on every stage's
start, and ``vesselseg params check`` must stay fast.  The code of a family is
imported only when :func:`vesselseg.families.get_family` asks for it.

Adding a family = one module under ``vesselseg/families/`` that defines ``FAMILY``
plus one line in :data:`FAMILIES` below.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from vesselseg.errors import ParamsError

__all__ = ["FAMILIES", "FamilyInfo", "family_names", "info"]


@dataclass(frozen=True)
class FamilyInfo:
    """What the schema must know about a family before any of its code is imported.

    ``losses``: the ``train.loss`` values the family can train with (None: any);
    ``two_class``: whether ``model.out_channels: 2`` (softmax) is supported;
    ``one_channel``: the family reads one-channel inputs only (``model.in_channels: 1``);
    ``needs_volumes``: trains on prepared volumes (``prepare.volumes: true``);
    ``target``: what one training sample is labelled with (``pixels``: a dense map;
    ``centre_pixel``: one label per patch); ``exportable``: ``vesselseg export`` can
    trace its network to ONNX/TorchScript; ``stackable``: ``model.stacks > 1`` chains
    its networks (a W-Net).
    """

    name: str
    module: str
    summary: str
    neural: bool
    network: str | None = None  # "module:Class" of the torch network, None for classical models
    losses: tuple[str, ...] | None = None
    two_class: bool = False
    one_channel: bool = False
    needs_volumes: bool = False
    target: str = "pixels"
    exportable: bool = False
    stackable: bool = False


FAMILIES: dict[str, FamilyInfo] = {
    f.name: f
    for f in (
        FamilyInfo(
            "unet",
            "vesselseg.families.unet",
            "configurable U-Net on patches, whole-image prediction",
            neural=True,
            network="vesselseg.models.unet:UNet",
            two_class=True,
            exportable=True,
            stackable=True,
        ),
        FamilyInfo(
            "ipn",
            "vesselseg.families.ipn",
            "Image Projection Network: OCTA volumes to en-face maps",
            neural=True,
            network="vesselseg.models.ipn:IPN",
            two_class=True,
            one_channel=True,
            needs_volumes=True,
        ),
        FamilyInfo(
            "resnet_patch",
            "vesselseg.families.resnet_patch",
            "ResNet34 classifier of each patch's centre pixel",
            neural=True,
            network="vesselseg.models.resnet_patch:ResNetPatch",
            losses=("bce",),
            target="centre_pixel",
        ),
        FamilyInfo(
            "knn", "vesselseg.families.knn", "k-NN on 3x3 neighbourhoods (scikit-learn)", neural=False, one_channel=True
        ),
        FamilyInfo(
            "vesselness",
            "vesselseg.families.vesselness",
            "multi-scale Frangi filter, threshold on validation",
            neural=False,
            one_channel=True,
        ),
    )
}


def family_names() -> tuple[str, ...]:
    return tuple(FAMILIES)


def info(name: str, where: str = "model.name") -> FamilyInfo:
    """The declared facts of family ``name``; an unknown name is a one-line error with a did-you-mean."""
    try:
        return FAMILIES[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), FAMILIES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ParamsError(f"{where}: unknown model {name!r} (valid: {sorted(FAMILIES)}){hint}") from None
