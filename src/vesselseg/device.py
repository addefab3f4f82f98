"""Device, precision and thread choices, made once per process from params and env.

Shared by training and prediction so the two can never disagree about what
"auto" means or which autocast dtype a GPU gets.
"""

from __future__ import annotations

import difflib
import logging
import os

import torch

from vesselseg.errors import ParamsError

log = logging.getLogger(__name__)

_DEVICE_NAMES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """Map a params value ("auto", "cpu", "cuda", "cuda:N") to a usable torch device.

    "auto" picks CUDA when present; asking for CUDA on a machine without it is an
    error rather than a silent fall-back, so a run never reports CPU timings as GPU ones.
    """
    base = str(name).split(":", 1)[0]
    if base not in _DEVICE_NAMES:
        close = difflib.get_close_matches(base, _DEVICE_NAMES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ParamsError(f"device must be one of {list(_DEVICE_NAMES)} (or 'cuda:N'), got {name!r}{hint}")
    if base == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if base == "cuda" and not torch.cuda.is_available():
        raise ParamsError(f"device {name!r} requested but CUDA is not available on this machine (use 'auto' or 'cpu')")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise ParamsError(f"device {name!r} is not a valid torch device ({err})") from None


def amp_dtype(device: torch.device, amp: bool = True) -> torch.dtype | None:
    """Autocast dtype for ``device``: bf16 where the GPU supports it, else fp16; None on CPU.

    bf16 keeps fp32's exponent range, so logits never overflow; fp16 is the fall-back
    for pre-Ampere GPUs.  CPU autocast is not used: it is slower for these convs.
    """
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def set_threads(threads: int) -> int:
    """Set torch's intra-op threads: env ``VESSELSEG_THREADS`` > param > every core.

    Parallel DVC queues (``dvc queue start -j 2``) give each run its share through the
    env var, so two runs do not fight over the same cores.
    """
    env = os.environ.get("VESSELSEG_THREADS")
    n = int(env) if env else (threads or os.cpu_count() or 1)
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


def to_channels_last(model: torch.nn.Module) -> bool:
    """Put a 2D conv net's weights in channels_last (NHWC) memory, in place; True if done.

    Not a CUDA-only trick: on the CPU, oneDNN's NHWC convolutions predict with every
    shipped 2D config in 0.57-0.86x and train it in 0.80-0.94x the NCHW time
    (``benchmarks/bench_memory_format.py``), because a 3x3 conv over 16-64 channels reads
    the channels of a pixel contiguously.  The weights decide the format: a (B, 1, H, W)
    input looks the same in both layouts, so converting only inputs would change nothing.
    Nets with 3D convs (IPN) are left as they are: channels_last is a 4D format.
    """
    if any(p.ndim == 5 for p in model.parameters()):
        return False
    # torch's Module.to overloads omit memory_format, which Module.to accepts (and documents)
    model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return True
