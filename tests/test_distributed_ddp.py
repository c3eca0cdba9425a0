"""LIFTAdamW under DistributedDataParallel on 2 gloo ranks (CPU): broadcast selections, sparse hook."""
import json

import pytest
import torch.distributed as dist

import dist_ddp_workers as workers
import lift_kernels as lk
from dist_harness import run_ranks
from helpers import TinyMLP

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def test_ddp_and_sparse_hook_reproduce_single_process(tmp_path):
    """One spawn of 2 ranks (start-up dominates the time) checks:
    - plain DDP, DDP with the sparse all-reduce hook (selector lift and gradient): every step equals
      single-process LIFTAdamW on the whole batch, ranks stay bitwise equal, a perturbed rank is
      caught, and the hook's bytes are recorded;
    - ranks seeded differently agree only through the selection broadcast;
    - a selection that raises on the selecting rank raises on every rank (none is left waiting)."""
    run_ranks(2, workers.all_checks, str(tmp_path))
    for selector in ("lift", "gradient"):
        per_step = json.loads((tmp_path / f"bytes_{selector}.json").read_text())
        dense_steps = {int(t) for t, b in per_step.items() if b["sent"] == b["dense"]}
        # full buckets exactly on the selecting steps (1, 3, 6), the selected entries otherwise
        assert dense_steps == {1, 3, 6}, (selector, per_step)
        sparse = per_step["2"]
        assert sparse["sent"] < 0.3 * sparse["dense"], sparse
        print(f"selector={selector}: bytes per step {per_step}")


def test_hook_refuses_sparse_grad_mode():
    opt = lk.LIFTAdamW(TinyMLP().parameters(), rank=2, lra_rank=3, sparse_grad=True)
    with pytest.raises(ValueError, match="sparse_grad=False"):
        lk.sparse_allreduce_hook(opt)
