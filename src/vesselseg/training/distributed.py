"""One code path for one process and for ``torchrun`` (DDP).

``torchrun`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; without them this is a
world of one and every helper is a no-op.  NCCL on GPUs, gloo on the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_world(device_type: str) -> World:
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    world = World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if device_type == "cuda":
        torch.cuda.set_device(world.local_rank)
    return world


def broadcast_flag(flag: bool, world: World) -> bool:
    """Rank 0 decides (early stopping); every rank follows."""
    if not world.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    dist.broadcast(t, src=0)
    return bool(t.item())


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def shutdown(world: World) -> None:
    """Destroy the process group (a DDP worker that returns normally, e.g. benchmarks/gpu.py)."""
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
