"""Model registry and self-describing model files.

A model file carries the config that built the network (as nnU-Net's trained-model
folder carries its plans), so ``predict`` and ``evaluate`` rebuild the exact network
from ``models/model.pt`` alone, without reading ``params.yaml`` again (which may
have changed since training).

File format ``vesselseg-model/1`` is a plain dict saved by ``torch.save``::

    {"format": "vesselseg-model/1", "config": {"name": "unet", ...},
     "state_dict": {name: tensor}, "extra": {...} | None, "torch_version": "2.13.0"}

Only plain Python types and tensors go in, so ``torch.load(weights_only=True)``
(no arbitrary code execution on load) can read it.
"""

from __future__ import annotations

import difflib
import inspect
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vesselseg.atomic import write_torch
from vesselseg.errors import DataError, ParamsError
from vesselseg.models.ipn import IPN
from vesselseg.models.resnet_patch import ResNetPatch
from vesselseg.models.unet import UNet, valid_padding_predictor

log = logging.getLogger(__name__)

__all__ = [
    "IPN",
    "MODEL_FORMAT",
    "ResNetPatch",
    "UNet",
    "build_model",
    "count_parameters",
    "load_model",
    "load_weights_into",
    "model_kind",
    "network_class",
    "read_model_file",
    "save_model",
    "valid_padding_predictor",
]

MODEL_FORMAT = "vesselseg-model/1"


def network_class(name: str, where: str = "model.name") -> type[nn.Module]:
    """The torch network of family ``name``, as the family registry declares it."""
    import importlib

    from vesselseg.registry import info

    spec = info(name, where).network
    if spec is None:
        raise ParamsError(f"{where}: {name!r} is not a neural network (it has no torch model to build)")
    module, _, cls = spec.partition(":")
    return getattr(importlib.import_module(module), cls)


def build_model(config: Mapping[str, Any]) -> nn.Module:
    """Build a network from ``{"name": ..., **kwargs}`` (what a family's network_config gives).

    Errors name the ``model.*`` key: an unknown name (with a did-you-mean), an
    unknown setting for that model, or a value the constructor rejects.
    """
    if not isinstance(config, Mapping):
        raise ParamsError(f"model: expected a mapping of settings, got {type(config).__name__}")
    kwargs = dict(config)
    name = kwargs.pop("name", None)
    if name is None:
        from vesselseg.registry import family_names

        raise ParamsError(f"model.name: missing (one of {sorted(family_names())})")
    cls = network_class(name)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    for key in kwargs:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ParamsError(f"model.{key}: unknown setting for model {name!r} (valid: {accepted}){hint}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise ParamsError(f"model ({name}): {err}") from None


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all of them unless ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _plain(obj: Any, where: str) -> Any:
    """Convert to types ``weights_only`` loading accepts, or say which value is not."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: key {k!r} must be a string")
            out[k] = _plain(v, f"{where}.{k}")
        return out
    if isinstance(obj, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise TypeError(f"{where}: {type(obj).__name__} cannot be stored in a model file (use plain Python types)")


def save_model(
    path: Path | str, model: nn.Module, config: Mapping[str, Any], extra: Mapping[str, Any] | None = None
) -> None:
    """Write weights + the config that rebuilds them, atomically.

    Tensors are detached and moved to the CPU so a model trained on a GPU loads on
    a machine without one.
    """
    obj = {
        "format": MODEL_FORMAT,
        "config": _plain(dict(config), "config"),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "extra": None if extra is None else _plain(dict(extra), "extra"),
        "torch_version": torch.__version__.split("+")[0],
    }
    write_torch(path, obj)  # through a buffer: byte-identical files for equal models
    log.debug("saved %s model to %s", obj["config"].get("name"), path)


def read_model_file(path: Path | str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The whole model file (weights included), checked to be a ``vesselseg-model/1`` dict."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: model file not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{path}: not a vesselseg model file (torch.load failed: {first[:200]})") from None
    if not isinstance(obj, dict) or obj.get("format") != MODEL_FORMAT:
        got = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        hint = " (looks like a bare state dict)" if isinstance(obj, dict) and "format" not in obj else ""
        raise DataError(f"{path}: not a vesselseg model file: format is {got!r}, expected {MODEL_FORMAT!r}{hint}")
    for key in ("config", "state_dict"):
        if not isinstance(obj.get(key), dict):
            raise DataError(f"{path}: model file has no {key!r} mapping")
    return obj


def _mismatch(path: Path, state: Mapping[str, torch.Tensor], model: nn.Module, what: str) -> str | None:
    """One line describing how ``state`` differs from ``model``'s tensors, or None."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        parts.append(f"{len(shapes)} with other shapes, file vs model (e.g. {'; '.join(shapes[:3])})")
    return f"{path}: weights do not match {what}: " + ", ".join(parts)


def load_model(path: Path | str, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network stored in ``path``; returns ``(model in eval mode, meta)``.

    ``meta`` is the file minus the weights: ``format``, ``config`` (what
    :func:`build_model` took), ``extra`` (what the trainer stored, or None) and
    ``torch_version``.
    """
    path = Path(path)
    obj = read_model_file(path, map_location)
    config = obj["config"]
    try:
        model = build_model(config)
    except ParamsError as err:
        raise DataError(f"{path}: the config stored in the model file is invalid: {err}") from None
    problem = _mismatch(path, obj["state_dict"], model, f"the architecture in its own config ({config})")
    if problem:
        raise DataError(problem)
    model.load_state_dict(obj["state_dict"])
    model.to(map_location)
    model.eval()
    meta = {k: v for k, v in obj.items() if k != "state_dict"}
    return model, meta


def load_weights_into(model: nn.Module, path: Path | str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a model file's weights into an existing ``model`` (fine-tuning, resuming).

    Unlike :func:`load_model` the architecture comes from the caller, so a file from
    another architecture is the expected failure: the DataError names both configs
    and the first differing keys/shapes.  Returns the file's meta.
    """
    path = Path(path)
    obj = read_model_file(path, map_location)
    problem = _mismatch(path, obj["state_dict"], model, f"this {type(model).__name__} (file config {obj['config']})")
    if problem:
        raise DataError(problem)
    model.load_state_dict(obj["state_dict"])
    return {k: v for k, v in obj.items() if k != "state_dict"}


def model_kind(path: Path | str) -> str:
    """``config["name"]`` of a model file, so predict picks the right predictor.

    Every model file, neural or classical, is a ``torch.save`` dict with a
    ``config`` holding ``name``; classical models store arrays, never pickles.
    """
    path = Path(path)
    obj = read_model_file(path, "cpu")
    config = obj.get("config") if isinstance(obj, dict) else None
    if not isinstance(config, dict) or "name" not in config:
        raise DataError(f"{path}: model file has no config name")
    return str(config["name"])
