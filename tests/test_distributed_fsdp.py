"""LIFTAdamW under FSDP2 (fully_shard, DTensor rows) on gloo ranks (CPU), and sharded checkpoints."""
import json

import pytest
import torch.distributed as dist

import dist_fsdp_workers as workers
from dist_harness import run_ranks

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def test_fsdp2_reproduces_single_process_and_resumes_on_more_ranks(tmp_path):
    """2 ranks: FSDP2 trajectories (magnitude, exact and fast LIFT selection, clipping) equal the
    single-process ones step by step, a perturbed shard is caught, and a checkpoint is written at
    step 4; 3 ranks: it loads and continues the same trajectory through a refresh."""
    ckpt = str(tmp_path / "ckpt")
    run_ranks(2, workers.trajectories_and_save, ckpt)
    run_ranks(3, workers.resume, ckpt)


def test_sharded_selection_matches_single_process(tmp_path):
    out = tmp_path / "selection.json"
    run_ranks(3, workers.sharded_selection, str(out))
    report = json.loads(out.read_text())
    print(report)
    assert report["exact"]["equal"], report
    assert report["fast"]["agreement"] >= 0.99, report
