"""Sparse-gradient mode: gathered gradients in backward, accumulation, clipping, GradScaler."""
import copy

import pytest
import torch

import lift_kernels as lk
from helpers import TinyMLP, make_batch
from lift_kernels.optim.gathered_grad import GatheredGrad


def _train(model, opt, batches, micro=3, clip=None):
    norms = []
    for x, y in batches:
        for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
            (torch.nn.functional.mse_loss(model(xs), ys) / micro).backward()
        if clip is not None:
            norms.append(opt.clip_grad_norm_(clip))
        opt.step()
        opt.zero_grad()
    return norms


@pytest.mark.parametrize("selector", ["lift", "gradient", "magnitude"])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_sparse_mode_equals_dense_mode_with_accumulation(selector, clip):
    torch.manual_seed(0)
    model = TinyMLP()
    twin = copy.deepcopy(model)
    kw = dict(lr=1e-2, rank=2, lra_rank=3, update_interval=3, selector=selector, weight_decay=0.01)
    dense_opt = lk.LIFTAdamW(model.parameters(), **kw)
    sparse_opt = lk.LIFTAdamW(twin.parameters(), sparse_grad=True, **kw)
    g = torch.Generator().manual_seed(4)
    batches = [make_batch(n=18, generator=g) for _ in range(8)]
    n_dense = _train(model, dense_opt, batches, clip=clip)
    n_sparse = _train(twin, sparse_opt, batches, clip=clip)
    for a, b in zip(n_dense, n_sparse):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    if clip is not None:
        assert any(n > clip for n in n_dense), "clipping must be exercised"


def test_backward_frees_dense_gradients_of_lift_weights():
    torch.manual_seed(0)
    model = TinyMLP()
    opt = lk.LIFTAdamW(model.parameters(), rank=2, lra_rank=3, update_interval=100, sparse_grad=True)
    x, y = make_batch()
    for _ in range(2):
        torch.nn.functional.mse_loss(model(x), y).backward()
        for w in (model.up.weight, model.down.weight):  # p.grad holds only the k gathered entries
            assert isinstance(w.grad, GatheredGrad) and w.grad.shape == w.shape
            assert w.grad.values.dtype == torch.float32
            assert w.grad.values.numel() == opt.state[w]["idx"].numel() < w.numel()
        assert type(model.up.bias.grad) is torch.Tensor  # dense parameters keep theirs
        opt.step()
        opt.zero_grad()
        assert model.up.weight.grad is None


@pytest.mark.parametrize("selector", ["gradient", "movement"])  # the selectors that score the gradient
@pytest.mark.parametrize("sparse", [True, False])
def test_gradient_selector_keeps_dense_grad_only_on_selecting_steps(selector, sparse):
    torch.manual_seed(0)
    model = TinyMLP()
    w = model.up.weight
    opt = lk.LIFTAdamW([w], rank=2, update_interval=2, selector=selector, sparse_grad=sparse)
    x, y = make_batch()
    kept = []
    for _ in range(4):
        whole = copy.deepcopy(model)  # the dense gradient, without LIFTAdamW's hooks
        torch.nn.functional.mse_loss(whole(x), y).backward()
        torch.nn.functional.mse_loss(model(x), y).backward()
        # dense and whole, not a GatheredGrad (sparse mode) nor masked to the selection (dense mode)
        kept.append(type(w.grad) is torch.Tensor and torch.equal(w.grad, whole.up.weight.grad))
        if not kept[-1]:
            assert isinstance(w.grad, GatheredGrad) if sparse else \
                torch.count_nonzero(w.grad) <= opt.state[w]["idx"].numel()
        opt.step()
        opt.zero_grad()
    assert kept == [True, True, False, True]  # selections before steps 1, 2 and 4 (t % 2 == 0)


def test_clip_with_density_one_equals_torch_clip():
    torch.manual_seed(0)
    model = TinyMLP()
    twin = copy.deepcopy(model)
    opt = lk.LIFTAdamW(model.parameters(), density=1.0, lra_rank=2)
    x, y = make_batch()
    torch.nn.functional.mse_loss(model(x), y).backward()
    torch.nn.functional.mse_loss(twin(x), y).backward()
    ours = opt.clip_grad_norm_(0.01)
    theirs = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.01)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)


def test_grad_scaler_in_dense_mode_unscales_and_skips_inf():
    torch.manual_seed(0)
    model = TinyMLP()
    twin = copy.deepcopy(model)
    kw = dict(lr=1e-2, rank=2, lra_rank=3)
    opt, opt_plain = lk.LIFTAdamW(model.parameters(), **kw), lk.LIFTAdamW(twin.parameters(), **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = make_batch()
    for _ in range(3):
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        torch.nn.functional.mse_loss(twin(x), y).backward()
        opt_plain.step()
        opt_plain.zero_grad()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
    model.up.weight.grad[0, 0] = float("inf")
    scale = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert scaler.get_scale() < scale


@pytest.mark.parametrize("sparse", [False, True])
def test_grad_scaler_unscales_and_skips_inf_in_both_modes(sparse):
    torch.manual_seed(0)
    model = TinyMLP()
    twin = copy.deepcopy(model)
    kw = dict(lr=1e-2, rank=2, lra_rank=3, update_interval=2)
    opt = lk.LIFTAdamW(model.parameters(), sparse_grad=sparse, **kw)
    opt_plain = lk.LIFTAdamW(twin.parameters(), **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = make_batch()
    for _ in range(3):
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        scaler.unscale_(opt)
        opt.clip_grad_norm_(0.05)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        torch.nn.functional.mse_loss(twin(x), y).backward()
        opt_plain.clip_grad_norm_(0.05)
        opt_plain.step()
        opt_plain.zero_grad()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    before = [p.detach().clone() for p in model.parameters()]
    steps = opt.state[model.up.weight]["step"]
    model.up.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()  # an overflowed gradient
    scale = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.state[model.up.weight]["step"] == steps
    assert scaler.get_scale() < scale
