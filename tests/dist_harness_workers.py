"""Rank bodies of tests/test_dist_harness.py: ranks that fail in each way the harness must report."""
from __future__ import annotations

import os
import time


def each_rank_fails_its_own_way(rank, world):
    """Rank 0 hangs outside any collective, rank 1 raises, rank 2 aborts (as a C++ std::terminate)."""
    if rank == 0:
        time.sleep(3600)
    elif rank == 1:
        raise ValueError("rank 1 refuses this step")
    else:
        os.abort()
