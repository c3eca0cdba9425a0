"""fp32 masters of the selected entries of bf16/fp16 weights."""
import copy
import io

import pytest
import torch

import lift_kernels as lk
from helpers import TinyMLP, make_batch


def _run(model, opt, steps=30, dtype=torch.float32):
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        x, y = make_batch(generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x.to(dtype)).float(), y).backward()
        opt.step()


# Per-step updates (about lr) below half the spacing of the largest weights (|w| ~ 0.1 to 0.2, which
# magnitude selection picks): plain half-precision updates round away, masters accumulate them.
@pytest.mark.parametrize("dtype,lr", [(torch.bfloat16, 1e-4), (torch.float16, 1e-5)])
def test_half_precision_run_with_masters_tracks_fp32_where_plain_updates_stall(dtype, lr):
    torch.manual_seed(0)
    model32 = TinyMLP()
    for p in model32.parameters():
        p.data = p.data.to(dtype).float()  # start from the representable values
    half = copy.deepcopy(model32).to(dtype)
    plain = copy.deepcopy(model32).to(dtype)
    kw = dict(lr=lr, rank=2, lra_rank=3, update_interval=1000, selector="magnitude")
    groups = lambda m: [{"params": [m.up.weight, m.down.weight], "lift": True}]  # noqa: E731
    opt32 = lk.LIFTAdamW(groups(model32), **kw)
    opt_half = lk.LIFTAdamW(groups(half), **kw)  # masters on by default for half weights
    opt_plain = lk.LIFTAdamW(groups(plain), master_weights=False, **kw)
    w0 = plain.up.weight.detach().clone()
    _run(model32, opt32)
    _run(half, opt_half, dtype=dtype)
    _run(plain, opt_plain, dtype=dtype)
    assert "master" in opt_half.state[half.up.weight] and "master" not in opt_plain.state[plain.up.weight]
    moved32 = (model32.up.weight - w0.float()).abs().sum()
    moved_half = (half.up.weight.float() - w0.float()).abs().sum()
    moved_plain = (plain.up.weight.float() - w0.float()).abs().sum()
    assert moved_plain < 0.2 * moved32
    assert abs(moved_half - moved32) < 0.2 * moved32
    st = opt_half.state[half.up.weight]
    idx = st["idx"].long()
    err = (st["master"] - model32.up.weight.view(-1)[idx]).abs().max()
    # the half run's forward pass is in half precision, so its gradients differ a little too
    assert err < 0.25 * (model32.up.weight - w0.float()).abs().max()
    assert torch.equal(half.up.weight.view(-1)[idx], st["master"].to(dtype))


def test_refresh_keeps_masters_of_kept_entries_exactly_and_reads_new_ones_from_weight():
    W = torch.nn.Parameter(torch.randn(12, 10).bfloat16())
    opt = lk.LIFTAdamW([W], lr=1e-3, rank=1, selector="random", update_interval=2)
    W.grad = torch.randn_like(W)
    opt.step()
    st = opt.state[W]
    old_idx, old_master = st["idx"].clone(), st["master"].clone()
    W.grad = torch.randn_like(W)
    opt.step()  # step 2 re-selects first, then updates
    new_idx = st["idx"]
    kept = torch.isin(new_idx, old_idx)
    assert kept.any() and (~kept).any()
    # a kept entry's master was carried, so it moved from its old value by at most one Adam step
    pos = torch.searchsorted(old_idx, new_idx[kept])
    assert torch.equal(new_idx[kept], old_idx[pos])
    moved = (st["master"][kept] - old_master[pos]).abs()
    assert moved.max() <= 1e-3 * 1.01 + 1e-6  # one Adam step of lr 1e-3 from the carried master


def test_masters_survive_checkpoint_as_fp32():
    W = torch.nn.Parameter(torch.randn(12, 10).half())
    opt = lk.LIFTAdamW([W], rank=1, lra_rank=2)
    W.grad = torch.randn_like(W)
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2 = lk.LIFTAdamW([W], rank=1, lra_rank=2)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert opt2.state[W]["master"].dtype == torch.float32
    assert torch.equal(opt2.state[W]["master"], opt.state[W]["master"])


def test_resume_with_sparse_grads_and_masters_is_bit_exact():
    torch.manual_seed(0)
    model = TinyMLP().to(torch.bfloat16)
    start = copy.deepcopy(model.state_dict())
    kw = dict(lr=1e-3, rank=2, lra_rank=3, update_interval=3, sparse_grad=True, seed=1)
    g = torch.Generator().manual_seed(3)
    batches = [make_batch(generator=g) for _ in range(9)]

    def train(m, opt, part):
        for x, y in part:
            torch.nn.functional.mse_loss(m(x.bfloat16()).float(), y).backward()
            opt.step()
            opt.zero_grad()

    train(model, lk.LIFTAdamW(model.parameters(), **kw), batches)
    first = TinyMLP().to(torch.bfloat16)
    first.load_state_dict(start)
    opt = lk.LIFTAdamW(first.parameters(), **kw)
    train(first, opt, batches[:4])  # past the refresh at step 3
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = TinyMLP().to(torch.bfloat16)
    resumed.load_state_dict(ckpt["model"])
    opt2 = lk.LIFTAdamW(resumed.parameters(), **kw)
    opt2.load_state_dict(ckpt["opt"])
    train(resumed, opt2, batches[4:])
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
