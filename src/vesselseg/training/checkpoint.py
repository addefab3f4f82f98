"""Resumable training state, written atomically at the end of every epoch.

The checkpoint holds everything the next epoch depends on (weights, optimizer,
scheduler, grad scaler, epoch, best score, history, RNG states) plus a fingerprint
of the params that shape training: a checkpoint left by a run with other params is
ignored with a warning rather than silently resumed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vesselseg import atomic

log = logging.getLogger(__name__)
FORMAT = "vesselseg-checkpoint/1"


def fingerprint(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    state = {"format": FORMAT, **state, "rng": rng_state()}
    atomic.write_torch(path, state)


def load_checkpoint(path: Path, fp: str) -> dict[str, Any] | None:
    """The saved state when it belongs to this configuration, else None."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a checkpoint is a cache: unreadable means start again
        log.warning("%s: unreadable checkpoint (%s); starting from scratch", path, err)
        return None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        log.warning("%s: not a vesselseg checkpoint; starting from scratch", path)
        return None
    if state.get("fingerprint") != fp:
        log.warning("%s: left by a run with other params; starting from scratch", path)
        return None
    return state
