"""Models that leave the project: ONNX and TorchScript files that describe themselves.

An exported file maps a float32 (N, C, H, W) image in [0, 1] (what
:func:`vesselseg.normalize.image_to_input` makes of the prepared uint8 image) to the
foreground probability (N, 1, H, W), for any H and W (dynamic axes).  The
preprocessing spec travels inside the file (ONNX ``metadata_props``, TorchScript
``_extra_files``) under :data:`SPEC_KEY`, so ``vesselseg segment --model F.onnx`` needs
nothing else.

Why a wrapper around the network: the U-Net pads its input up to a multiple of
``2**depth`` with a Python ``if``, which tracing freezes at the example's size.
:class:`ExportWrapper` does the same reflect padding with tensor slicing (traced as
ops on the input's shape), so the inner ``if`` is never taken and the exported graph
handles every size; the result equals the eager network (see tests/test_export.py).
The legacy TorchScript-based ONNX exporter is used (``dynamo=False``): the dynamo
exporter needs onnxscript, one more dependency for the same graph.
"""

from __future__ import annotations

import io as _io
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vesselseg import atomic
from vesselseg.errors import DataError, ParamsError

log = logging.getLogger(__name__)

__all__ = [
    "FORMATS",
    "SPEC_KEY",
    "ExportWrapper",
    "export_model",
    "onnx_bytes",
    "read_onnx_spec",
    "read_torchscript_spec",
]

FORMATS = ("onnx", "torchscript")
SPEC_KEY = "vesselseg.preprocessing"
ONNX_OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "probability"


class ExportWrapper(nn.Module):
    """Reflect-pad to a multiple of ``2**depth``, run the U-Net, crop, turn logits into probability."""

    def __init__(self, net: nn.Module, out_channels: int = 1) -> None:
        super().__init__()
        self.net = net
        self.multiple = 2 ** int(getattr(net, "depth", 0))
        self.two_class = int(out_channels) == 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        m = self.multiple
        ph = (m - h % m) % m
        pw = (m - w % m) % m
        # torch.nn.functional.pad(mode="reflect") with a pad computed from the shape
        # is frozen by the tracer; slices of the input are not
        x = torch.cat([x, x[..., h - 1 - ph : h - 1, :].flip(-2)], dim=-2)
        x = torch.cat([x, x[..., :, w - 1 - pw : w - 1].flip(-1)], dim=-1)
        logits = self.net(x)[..., :h, :w].float()
        if self.two_class:
            return torch.softmax(logits, dim=1)[:, 1:2]
        return torch.sigmoid(logits)


def _wrap(model: nn.Module, config: dict[str, Any], where: str) -> tuple[ExportWrapper, torch.Tensor]:
    from vesselseg.models import UNet

    if not isinstance(model, UNet):
        raise DataError(f"{where}: model {config.get('name')!r} cannot be exported yet (U-Net family only)")
    if model.padding != "same":
        raise DataError(
            f"{where}: a 'valid'-padding U-Net cannot be exported with dynamic sizes (model.padding same only)"
        )
    wrapper = ExportWrapper(model, int(config.get("out_channels", 1))).eval()
    side = 4 * wrapper.multiple  # a multiple of 2**depth: the network's own padding branch stays untraced
    example = torch.rand(1, int(config.get("in_channels", 1)), side, side)
    return wrapper, example


def onnx_bytes(model: nn.Module, config: dict[str, Any], spec: dict[str, Any] | None, where: str = "model") -> bytes:
    """The ONNX file of ``model`` (dynamic N, H, W), with ``spec`` in its metadata."""
    import warnings

    try:
        import onnx
    except ImportError:
        raise DataError(
            "ONNX export needs the onnx package: pip install onnx (pinned in requirements/constraints.txt)"
        ) from None
    wrapper, example = _wrap(model, config, where)
    buf = _io.BytesIO()
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about the untaken Python branches
        torch.onnx.export(
            wrapper,
            (example,),
            buf,  # type: ignore[arg-type]  # torch annotates f as a path; the TorchScript exporter (dynamo=False) writes to any file object
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes},
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    proto = onnx.load_from_string(buf.getvalue())
    meta = {
        SPEC_KEY: json.dumps(spec, sort_keys=True) if spec is not None else "",
        "vesselseg.config": json.dumps(config, sort_keys=True),
    }
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


def torchscript_bytes(
    model: nn.Module, config: dict[str, Any], spec: dict[str, Any] | None, where: str = "model"
) -> bytes:
    """A traced TorchScript module (dynamic sizes), with the spec as an extra file."""
    import warnings

    wrapper, example = _wrap(model, config, where)
    buf = _io.BytesIO()
    extra = {
        SPEC_KEY: json.dumps(spec, sort_keys=True) if spec is not None else "",
        "vesselseg.config": json.dumps(config, sort_keys=True),
    }
    with warnings.catch_warnings():
        # tracer warnings about the untaken Python branches, and torch 2.13's notice that
        # TorchScript is deprecated in favour of torch.export (which fixes H and W)
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper, example)
        torch.jit.save(traced, buf, _extra_files=extra)
    return buf.getvalue()


def export_model(model_ref: str | Path, fmt: str, out: Path | str) -> Path:
    """Export a model (any reference ``segment`` accepts) to ``out``, atomically."""
    from vesselseg.segment import resolve_model

    if fmt not in FORMATS:
        raise ParamsError(f"--format: unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    ref = resolve_model(model_ref)
    if ref.kind != "torch":
        raise DataError(f"{model_ref}: only a vesselseg model file can be exported (this is {ref.kind})")
    from vesselseg.models import load_model

    model, meta = load_model(ref.path, map_location="cpu")
    spec = (meta.get("extra") or {}).get("preprocessing")
    if spec is None:
        from vesselseg.segment import missing_spec_error

        raise missing_spec_error(ref.path)
    config = dict(meta["config"])
    make = onnx_bytes if fmt == "onnx" else torchscript_bytes
    data = make(model, config, spec, str(ref.path))
    out = Path(out)
    atomic.write_bytes(out, data)
    log.info("exported %s to %s (%s, %.1f MB)", ref.path, out, fmt, len(data) / 1e6)
    return out


def read_onnx_spec(path: Path) -> dict[str, Any] | None:
    """The spec stored in an exported ONNX file, or None."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:
        raise DataError(f"{path}: not a readable ONNX file ({type(err).__name__})") from None
    props = {p.key: p.value for p in proto.metadata_props}
    text = props.get(SPEC_KEY)
    return json.loads(text) if text else None


def read_torchscript_spec(path: Path) -> tuple[torch.jit.ScriptModule, dict[str, Any] | None]:
    """Load an exported TorchScript file and the spec stored beside its code."""
    import warnings

    extra = {SPEC_KEY: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13: TorchScript is deprecated
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as err:
        raise DataError(f"{path}: not a readable TorchScript file ({type(err).__name__})") from None
    text = extra[SPEC_KEY]
    text = text.decode() if isinstance(text, bytes) else text
    return module, (json.loads(text) if text else None)
