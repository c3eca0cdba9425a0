"""Rank bodies of tests/test_dist_harness.py: ranks that fail in each way the harness must report,
and ranks that must end cleanly although a gloo thread is still in Python."""
from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist


def each_rank_fails_its_own_way(rank, world):
    """Rank 0 hangs outside any collective, rank 1 raises, rank 2 aborts (as a C++ std::terminate)."""
    if rank == 0:
        time.sleep(3600)
    elif rank == 1:
        raise ValueError("rank 1 refuses this step")
    else:
        os.abort()


_KEPT = []


def python_callback_outlives_the_body(rank, world):
    """A gloo worker thread is still inside a Python future callback (as a comm hook's ``then``
    runs) when the rank's body, barrier and teardown are done, and its group outlives
    destroy_process_group() (as DDP keeps the default group): the rank must still end cleanly.
    The work runs on a group of its own, which the harness's final barrier does not wait for."""
    group = dist.new_group()
    _KEPT.append(group)  # freed, and its threads joined, only when the interpreter ends
    t = torch.ones(3)
    if rank == 1:
        def late(fut):
            time.sleep(3)  # releases the GIL, as a starved worker thread is late to take it back
            return fut.value()[0]
        dist.all_reduce(t, group=group, async_op=True).get_future().then(late)
    else:
        time.sleep(1)  # so that rank 1's callback is registered first and runs on a gloo thread
        dist.all_reduce(t, group=group)
