"""Rank bodies of tests/test_distributed_ddp.py (run by dist_harness.run_ranks)."""
from __future__ import annotations

import copy
import json

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import lift_kernels as lk
from dist_harness import gathered, ranks_agree
from lift_kernels.distributed import SelectionFailedElsewhere
from helpers import TinyMLP, make_batch

STEPS = 7  # selections before steps 1, 3 and 6 (update_interval 3)
HP = dict(lr=2e-2, rank=2, lra_rank=3, update_interval=3, weight_decay=0.01)


def _batches(world: int, rank: int):
    """The same global batches everywhere; each rank trains on its own slice of each."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        x, y = make_batch(n=16, generator=g)
        out.append(((x, y), (x.chunk(world)[rank], y.chunk(world)[rank])))
    return out


def _step(model, opt, x, y):
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def _lift_weights(model):
    return [model.up.weight, model.down.weight]


def _trajectory(rank, world, selector, hooked, out_dir):
    torch.manual_seed(0)
    ref = TinyMLP()
    model = copy.deepcopy(ref)
    ref_opt = lk.LIFTAdamW(ref.parameters(), selector=selector, selection_group=None, **HP)
    ddp = DDP(model, bucket_cap_mb=0.002)  # several small buckets: offsets inside buckets matter
    opt = lk.LIFTAdamW(ddp.parameters(), selector=selector, **HP)
    hook = None
    if hooked:
        hook = lk.sparse_allreduce_hook(opt)
        ddp.register_comm_hook(hook, hook.hook)
    changed = False
    for t, (full, local) in enumerate(_batches(world, rank), start=1):
        before = opt.state[model.up.weight]["idx"].clone() if t > 1 else None
        _step(ref, ref_opt, *full)
        _step(ddp, opt, *local)
        for p, q in zip(_lift_weights(model), _lift_weights(ref)):
            assert torch.equal(opt.state[p]["idx"], ref_opt.state[q]["idx"]), f"{selector}: selection differs at step {t}"
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"{selector}, step {t}")
        state = torch.cat([p.detach().flatten() for p in model.parameters()])
        assert ranks_agree(state), f"ranks diverged at step {t}"
        assert ranks_agree(opt.state[model.up.weight]["idx"])
        changed |= before is not None and not torch.equal(before, opt.state[model.up.weight]["idx"])
        if hooked and t in (2, 4):  # sparse steps: LIFT gradients were reduced at the selection only
            for p in _lift_weights(model):
                mask = torch.ones(p.numel(), dtype=torch.bool)
                mask[opt.state[p]["idx"].long()] = False
                assert torch.all(p.grad.view(-1)[mask] == 0), "the hook sent more than the selection"
    assert changed, "a refresh must change the selection for the test to cover it"
    if hooked and rank == 0:
        per_step = {t: {"sent": s, "dense": d} for t, (s, d) in sorted(hook.per_step.items())}
        with open(f"{out_dir}/bytes_{selector}.json", "w") as f:
            json.dump(per_step, f)
    return model


def trajectories(rank, world, out_dir):
    for selector, hooked in (("lift", False), ("lift", True), ("gradient", True)):
        model = _trajectory(rank, world, selector, hooked, out_dir)
    # the divergence check must be able to fail: one rank's copy drifts by one ulp-ish
    state = torch.cat([p.detach().flatten() for p in model.parameters()])
    if rank == 1:
        state[5] += 1e-6
    assert not ranks_agree(state), "the cross-rank check did not see a perturbed rank"


def broadcast_makes_ranks_agree(rank, world, out_dir):
    """Ranks seeded differently select differently on their own; the broadcast overrides that."""
    selections = {}
    for selection_group in ("world", None):
        torch.manual_seed(0)
        model = DDP(TinyMLP())
        opt = lk.LIFTAdamW(model.parameters(), selector="random", seed=rank, selection_group=selection_group, **HP)
        x, y = make_batch(n=8)
        _step(model, opt, x, y)
        selections[selection_group] = opt.state[model.module.up.weight]["idx"]
    agree = [ranks_agree(selections["world"]), ranks_agree(selections[None])]
    assert agree == [True, False], f"broadcast selection agreement {agree}, expected [True, False]"
    all_idx = gathered(selections["world"])
    assert all(torch.equal(all_idx[0], i) for i in all_idx)


def failed_selection_raises_everywhere(rank, world, out_dir):
    """A selection that raises on the selecting rank (rank 0) raises on the others too, rather than
    leaving them in the broadcast; afterwards the ranks are still in step (a collective works)."""
    torch.manual_seed(0)
    model = DDP(TinyMLP())
    opt = lk.LIFTAdamW(model.parameters(), **HP)
    if rank == 0:
        def fail(chunk):
            raise FloatingPointError("injected selection failure")
        opt.strategy.whole_indices = fail
    try:
        _step(model, opt, *make_batch(n=8))
        raised = None
    except (FloatingPointError, SelectionFailedElsewhere) as e:
        raised = type(e).__name__
    expected = ["FloatingPointError"] + ["SelectionFailedElsewhere"] * (world - 1)
    assert gathered(raised) == expected


def all_checks(rank, world, out_dir):
    trajectories(rank, world, out_dir)
    broadcast_makes_ranks_agree(rank, world, out_dir)
    failed_selection_raises_everywhere(rank, world, out_dir)
