"""How a selection uses the CPU's threads: independent jobs side by side, few intra-op threads each.

The selection of a bucket is many small dense linear-algebra calls (GEMMs, Cholesky, eigh on
matrices of a few hundred rows). Under torch's OpenMP threads each call forks and joins; when
another process holds a core, every join waits for a descheduled thread. Measured on a 2-core
machine (SmolLM2-135M's first selection, rank 16, lra_rank 32, whole model, bench/bench_selection_cpu.py):
beside a busy process, buckets one after the other with two threads took 133 s (exact) and 20 s
(fast); side by side with one thread each 18 s and 6.2 s, and alone 5.8 s and 6.3 s (before: 10.5 s
and 5.0 s). A 576x576 SVD took 52 ms alone and 0.5-8.9 s beside a busy process with two threads.
So independent jobs (the buckets of matrices of one shape) run side by side on a pool of workers,
and torch's threads are shared out among them: with no more threads than jobs, one each, so no job
joins threads, and a descheduled worker delays only its own job.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count (OpenMP and MKL) set to ``n`` in the block, restored after it."""
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_jobs(jobs: list[Callable[[], T]], on_cpu: bool, side_by_side: bool = True) -> list[T]:
    """Results of ``jobs`` in their order. On the CPU, if ``side_by_side`` (the jobs are independent
    and make no collective calls), up to torch's thread count of them run at once, with that count
    shared out among them as intra-op threads (one each when there are at least as many jobs as
    threads); otherwise one after the other with one intra-op thread. Elsewhere they run one after
    the other as they are."""
    if not on_cpu:
        return [job() for job in jobs]
    threads = torch.get_num_threads()
    workers = min(threads, len(jobs)) if side_by_side and not modes_active() else 1
    with intra_op_threads(max(1, threads // workers) if side_by_side else 1):
        if workers <= 1:
            return [job() for job in jobs]
        # a new thread takes torch's thread count (set just above) when it first runs an op
        with ThreadPoolExecutor(workers, thread_name_prefix="lift-select") as pool:
            return list(pool.map(lambda job: job(), jobs))


def modes_active() -> bool:
    """Whether a dispatch or function mode is active here (FakeTensorMode, MemTracker, ``with
    torch.device(...)``): modes are per thread, so jobs on worker threads would escape them."""
    from torch.overrides import _get_current_function_mode_stack
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return bool(_get_current_dispatch_mode_stack()) or bool(_get_current_function_mode_stack())
