"""Rank bodies of tests/test_distributed_fsdp.py (run by dist_harness.run_ranks)."""
from __future__ import annotations

import copy
import json

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard, distribute_tensor

import lift_kernels as lk
from lift_kernels.distributed import load_checkpoint, save_checkpoint
from lift_kernels.reference import topk_flat_indices
from dist_harness import gathered
from helpers import TinyMLP, make_batch

STEPS = 8  # selections before steps 1, 3 and 6 (update_interval 3)
SAVE_AT = 4
HP = dict(lr=2e-2, rank=2, lra_rank=3, update_interval=3, weight_decay=0.01)
CONFIGS = {  # name: (LIFTAdamW options, gradient clipping)
    "magnitude": (dict(selector="magnitude"), None),
    "lift_exact": (dict(selector="lift", svd="exact"), 0.05),
    "lift_fast": (dict(selector="lift", svd="fast"), None),
    # FSDP2 runs post-accumulate-grad hooks on the sharded parameters: gathered shard gradients
    "lift_fast_sparse_grad": (dict(selector="lift", svd="fast", sparse_grad=True), 0.05),
}


def _batches(world: int, rank: int):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        x, y = make_batch(n=12, generator=g)  # 12 rows split evenly over 2 or 3 ranks
        out.append(((x, y), (x.chunk(world)[rank], y.chunk(world)[rank])))
    return out


def _step(model, opt, x, y, clip):
    """One step; returns the gradient norm before clipping (None without clipping)."""
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    if opt.sparse_grad:  # dense gradients of LIFT weights were gathered and freed during backward
        # (into p.grad as a GatheredGrad for plain weights, into the optimizer for sharded ones)
        assert all(p.grad is None or type(p.grad).__name__ == "GatheredGrad" for p in opt.lift_parameters())
    norm = opt.clip_grad_norm_(clip) if clip is not None else None
    opt.step()
    return norm


def _sharded_model(world: int):
    torch.manual_seed(0)
    ref = TinyMLP()
    model = copy.deepcopy(ref)
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model.up, mesh=mesh)
    fully_shard(model.down, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, ref


def _global_idx(p, opt):
    """The full selection of a sharded weight, assembled from every rank's local indices."""
    local = p.to_local()
    offset = int(torch.tensor(gathered(local.shape[0]))[: p.device_mesh.get_local_rank()].sum())
    mine = opt.state[p]["idx"].long() + offset * p.shape[1]
    return torch.cat(gathered(mine)).to(torch.int32)


def _check_same(model, opt, ref, ref_opt, where):
    """Sharded run == single-process run: selections exactly, weights to fp32 rounding."""
    for name in ("up.weight", "down.weight"):
        p, q = model.get_parameter(name), ref.get_parameter(name)
        assert torch.equal(_global_idx(p, opt), ref_opt.state[q]["idx"]), f"{where}: {name} selection differs"
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.full_tensor(), q.detach(), rtol=1e-5, atol=1e-6, msg=f"{where}: {name}")


def _reference(config):
    kw, clip = CONFIGS[config]
    torch.manual_seed(0)
    ref = TinyMLP()
    return ref, lk.LIFTAdamW(ref.parameters(), selection_group=None, **HP, **kw), clip


def trajectories_and_save(rank, world, ckpt_dir):
    """FSDP2 runs equal single-process runs for three selectors; one is checkpointed mid-way."""
    for config, (kw, clip) in CONFIGS.items():
        model, _ = _sharded_model(world)
        ref, ref_opt, _ = _reference(config)
        opt = lk.LIFTAdamW(lk.lift_param_groups(model, train_other=True), **HP, **kw)  # sees DTensors
        clipped = False
        for t, (full, local) in enumerate(_batches(world, rank), start=1):
            ref_norm = _step(ref, ref_opt, *full, clip)
            norm = _step(model, opt, *local, clip)
            _check_same(model, opt, ref, ref_opt, f"{config}, step {t}")
            if clip is not None:
                torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=0)
                clipped |= bool(norm > clip)
            if t == SAVE_AT and config == "lift_exact":
                save_checkpoint(ckpt_dir, model, opt)
        assert clip is None or clipped, "clipping must be exercised"
        # state covers this rank's rows only: k entries over all ranks together
        k_local = torch.tensor(opt.state[model.up.weight]["idx"].numel())
        dist.all_reduce(k_local)
        assert int(k_local) == (37 + 23) * 2
    # the comparison must be able to fail: one rank's shard drifts
    if rank == 1:
        with torch.no_grad():
            model.up.weight.to_local().view(-1)[0] += 1e-4
    try:
        _check_same(model, opt, ref, ref_opt, "perturbed")
    except AssertionError:
        pass
    else:
        raise AssertionError("the comparison with the single-process run did not see a perturbed shard")


def resume(rank, world, ckpt_dir):
    """A checkpoint written on another number of ranks continues the same trajectory here."""
    model, _ = _sharded_model(world)
    kw, clip = CONFIGS["lift_exact"]
    groups = lk.lift_param_groups(model, train_other=True)
    opt = lk.LIFTAdamW(groups, **{**HP, "lr": 1.0}, **kw)  # lr comes from the checkpoint
    load_checkpoint(ckpt_dir, model, opt)
    ref, ref_opt, _ = _reference("lift_exact")
    for t, (full, local) in enumerate(_batches(world, rank), start=1):
        _step(ref, ref_opt, *full, clip)
        if t == SAVE_AT:
            _check_same(model, opt, ref, ref_opt, f"after loading (step {t})")
        if t > SAVE_AT:
            _step(model, opt, *local, clip)
            _check_same(model, opt, ref, ref_opt, f"resumed, step {t}")


def sharded_selection(rank, world, out_path):
    """Selection of DTensor weights on a gloo DeviceMesh against the single-process selection:
    exact for ties spread over ranks (radix top-k), and the fast low-rank path's agreement."""
    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(3)
    ties = torch.randint(-3, 4, (29, 17), generator=g).float()  # many equal |w| across row blocks
    W = torch.randn(96, 64, generator=g) @ torch.diag(torch.linspace(2, 0.1, 64))
    # wide enough for the block Krylov path (not the exact fallback), split basis and split sketch
    tall = torch.randn(700, 3, generator=g) @ torch.randn(3, 400, generator=g)
    tall += 0.05 * torch.randn(700, 400, generator=g)
    G = torch.randn(96, 64, generator=g)  # the gradient the gradient scorers read
    report = {}
    for name, M, kw in (("ties_magnitude", ties, dict(selector="magnitude", rank=3)),
                        ("ties_smallest", ties, dict(selector="magnitude", rank=3, largest=False)),
                        ("fast", W, dict(selector="lift", svd="fast", density=0.05, lra_rank=6)),
                        ("exact", W, dict(selector="lift", svd="exact", density=0.05, lra_rank=6)),
                        ("fast_krylov_tall", tall, dict(selector="lift", svd="fast", density=0.05, lra_rank=2)),
                        ("fast_krylov_wide", tall.T.contiguous(), dict(selector="lift", svd="fast", density=0.05,
                                                                     lra_rank=2)),
                        ("movement", W, dict(selector="movement", density=0.05)),
                        ("random", W, dict(selector="random", density=0.05))):
        p = torch.nn.Parameter(distribute_tensor(M.clone(), mesh, [Shard(0)]))
        q = torch.nn.Parameter(M.clone())
        opts = [lk.LIFTAdamW([x], seed=5, **kw) for x in (p, q)]
        opts[1].selection_group = None
        grads = (distribute_tensor(G.clone(), mesh, [Shard(0)]), G.clone()) if name == "movement" else \
            (torch.zeros_like(p), torch.zeros_like(q))
        for x, o, grad in zip((p, q), opts, grads):
            x.grad = grad
            o.step()
        mine, ref = _global_idx(p, opts[0]), opts[1].state[q]["idx"]
        agreement = len(set(mine.tolist()) & set(ref.tolist())) / max(1, ref.numel())
        report[name] = {"k": ref.numel(), "agreement": agreement, "equal": bool(torch.equal(mine, ref))}
        if name.startswith("ties"):
            assert torch.equal(mine, topk_flat_indices(M.abs(), ref.numel(), kw.get("largest", True)))
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(report, f)


def resume_and_select(rank, world, ckpt_dir, report_path):
    resume(rank, world, ckpt_dir)
    sharded_selection(rank, world, report_path)
