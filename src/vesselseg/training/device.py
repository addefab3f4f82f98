"""Device and thread choices, made once per process from params and the environment."""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from vesselseg.errors import ParamsError

        raise ParamsError("train.device: 'cuda' requested but no CUDA device is available (use 'auto' or 'cpu')")
    return torch.device(name)


def set_threads(threads: int) -> int:
    """Set torch's intra-op threads: env ``VESSELSEG_THREADS`` > param > every core.

    Parallel DVC queues (``dvc queue start -j 2``) give each run its share through the
    env var, so two runs do not fight over the same cores.
    """
    env = os.environ.get("VESSELSEG_THREADS")
    n = int(env) if env else (threads or os.cpu_count() or 1)
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU supports it (no scaler needed), else fp16; None on the CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
