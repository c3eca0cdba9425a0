"""LIFTAdamW under FSDP2 (fully_shard, DTensor rows) on gloo ranks (CPU), and sharded checkpoints."""
import copy
import json

import pytest
import torch
import torch.distributed as dist

import dist_fsdp_workers as workers
import lift_kernels as lk
from dist_harness import run_ranks
from helpers import TinyMLP, loss_step, make_batch
from lift_kernels.distributed import load_checkpoint, save_checkpoint
from lift_kernels.distributed.placement import RowShard
from lift_kernels.distributed.sharded_topk import sharded_topk_flat_indices
from lift_kernels.reference import topk_flat_indices

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def test_fsdp2_reproduces_single_process_and_resumes_on_more_ranks(tmp_path):
    """2 ranks: FSDP2 trajectories (magnitude, exact and fast LIFT selection, clipping, sparse
    gradients) equal the single-process ones step by step, a perturbed shard is caught, and a
    checkpoint is written at step 4. 3 ranks: it loads and continues the same trajectory through a
    refresh; and DTensor weights on a bare DeviceMesh select as one process does (ties spread over
    ranks, exact and fast low-rank paths, movement and random scores restricted to the rows)."""
    ckpt, report_path = str(tmp_path / "ckpt"), tmp_path / "selection.json"
    run_ranks(2, workers.trajectories_and_save, ckpt)
    run_ranks(3, workers.resume_and_select, ckpt, str(report_path))
    report = json.loads(report_path.read_text())
    print(report)
    assert report["exact"]["equal"], report
    assert report["movement"]["equal"] and report["random"]["equal"], report  # same selectors, on rows
    assert report["fast"]["agreement"] >= 0.99, report
    assert report["fast_krylov_tall"]["agreement"] >= 0.999, report
    assert report["fast_krylov_wide"]["agreement"] >= 0.999, report


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("largest", [True, False])
def test_radix_topk_equals_topk_flat_indices(dtype, largest):
    """The collective top-k on one rank: the same k entries and tie rule as the reference, with
    many ties, signed zeros, negative values, k from 0 to m*n, one matrix or a batch."""
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        m, n = torch.randint(1, 12, (2,), generator=g).tolist()
        b = 1 + trial % 3
        s = (torch.randint(-3, 4, (b, m, n), generator=g) * 0.5).to(dtype)
        s[s == 0] = torch.where(torch.rand(b, m, n, generator=g) < 0.5, -0.0, 0.0)[s == 0].to(dtype)
        if trial % 4 == 0:
            s = torch.randn(b, m, n, generator=g).to(dtype)
        scores = s[0] if b == 1 else s
        one_rank = RowShard(None, 0, 1, 0, m, (m, n))
        for k in sorted({0, 1, m * n // 3, m * n}):
            got = sharded_topk_flat_indices(scores, k, largest, one_rank)
            want = topk_flat_indices(scores, k, largest).reshape(b, k)
            for i in range(b):
                assert torch.equal(got[i], want[i]), (trial, k)


def test_checkpoint_in_one_process_resumes_bit_for_bit(tmp_path):
    """save_checkpoint/load_checkpoint without a process group: the resumed run equals the
    uninterrupted one exactly, through a refresh, with bf16 weights (masters) and a dense group."""
    torch.manual_seed(0)
    model = TinyMLP().to(torch.bfloat16)
    twin = copy.deepcopy(model)
    kw = dict(lr=2e-2, rank=2, lra_rank=3, update_interval=3)
    opt = lk.LIFTAdamW(lk.lift_param_groups(model, train_other=True), **kw)
    g = torch.Generator().manual_seed(1)
    batches = [tuple(t.to(torch.bfloat16) for t in make_batch(generator=g)) for _ in range(7)]
    for x, y in batches[:4]:
        loss_step(model, opt, x, y)
    save_checkpoint(str(tmp_path / "ckpt"), model, opt)
    for x, y in batches[4:]:
        loss_step(model, opt, x, y)
    resumed = lk.LIFTAdamW(lk.lift_param_groups(twin, train_other=True), **{**kw, "lr": 1.0})
    load_checkpoint(str(tmp_path / "ckpt"), twin, resumed)
    assert "master" in resumed.state[twin.up.weight]
    for x, y in batches[4:]:
        loss_step(twin, resumed, x, y)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_checkpoint_of_other_groups_is_refused(tmp_path):
    torch.manual_seed(0)
    model = TinyMLP()
    opt = lk.LIFTAdamW(lk.lift_param_groups(model, train_other=True), rank=2, lra_rank=3)
    loss_step(model, opt, *make_batch())
    save_checkpoint(str(tmp_path / "ckpt"), model, opt)
    other = lk.LIFTAdamW(model.parameters(), rank=2, lra_rank=3)  # one group: not the saved layout
    with pytest.raises(ValueError, match="parameter groups"):
        load_checkpoint(str(tmp_path / "ckpt"), model, other)
