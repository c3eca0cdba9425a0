"""Running a test body on several gloo ranks (spawned processes) and comparing ranks with each other.

Workers live in importable modules (dist_*_workers.py): spawned children import them by name. A
failing assertion in any rank fails the spawning test with that rank's traceback.
"""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    torch.set_num_threads(1)  # CI has 2 cores for all ranks together
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, fn, *args) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; raises if any rank fails."""
    mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True,
                       start_method="spawn")


def gathered(obj) -> list:
    """Every rank's ``obj``, in rank order."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def ranks_agree(t: torch.Tensor) -> bool:
    """Whether every rank holds exactly this tensor (bitwise)."""
    return all(torch.equal(t, other) for other in gathered(t.detach().cpu()))
