"""torch's own gradient tools (clip_grad_norm_, zero_grad, p.grad = None) on LIFT weights, both modes.

The gradient they see is the one the step applies: the selected entries of each LIFT weight (the
rest is zero in dense mode and absent in sparse mode) and all entries of dense parameters.
"""
import copy

import pytest
import torch

import lift_kernels as lk
from helpers import TinyMLP, make_batch

KW = dict(lr=1e-2, rank=2, lra_rank=3, update_interval=3, weight_decay=0.01)


def _loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def _train(model, opt, batches, clip, micro=2):
    """Accumulate ``micro`` micro-batches, clip with ``clip(model, opt)``, step; returns the norms."""
    norms = []
    for x, y in batches:
        for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
            (_loss(model, xs, ys) / micro).backward()
        norms.append(clip(model, opt))
        opt.step()
        opt.zero_grad()
    return norms


def _torch_clip(model, opt):
    return torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)


def _opt_clip(model, opt):
    return opt.clip_grad_norm_(0.05)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("selector", ["lift", "random"])
def test_torch_clip_grad_norm_equals_opt_clip_grad_norm(sparse, selector):
    torch.manual_seed(0)
    model = TinyMLP()
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(4)
    batches = [make_batch(n=12, generator=g) for _ in range(7)]
    ours = _train(model, lk.LIFTAdamW(model.parameters(), sparse_grad=sparse, selector=selector, **KW),
                  batches, _torch_clip)
    ref = _train(twin, lk.LIFTAdamW(twin.parameters(), selector=selector, **KW), batches, _opt_clip)
    assert all(n > 0.05 for n in ref), "clipping must be exercised"
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("sparse", [False, True])
def test_clip_grad_value_clamps_the_applied_gradient(sparse):
    torch.manual_seed(0)
    model = TinyMLP()
    twin = copy.deepcopy(model)
    opt = lk.LIFTAdamW(model.parameters(), sparse_grad=sparse, **KW)
    ref = lk.LIFTAdamW(twin.parameters(), **KW)
    g = torch.Generator().manual_seed(6)
    for _ in range(4):  # Adam's first step is scale-free; later ones see the clamping
        x, y = make_batch(generator=g)
        _loss(model, x, y).backward()
        _loss(twin, x, y).backward()
        torch.nn.utils.clip_grad_value_(model.parameters(), 2e-3)
        for p in twin.parameters():
            p.grad.clamp_(-2e-3, 2e-3)
        opt.step()
        ref.step()
        opt.zero_grad()
        ref.zero_grad()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


DISCARDS = {
    "model.zero_grad()": lambda model, opt: model.zero_grad(),
    "p.grad = None": lambda model, opt: [setattr(p, "grad", None) for p in model.parameters()],
    "opt.zero_grad()": lambda model, opt: opt.zero_grad(),
    "zero_grad(set_to_none=False)": lambda model, opt: model.zero_grad(set_to_none=False),
    "opt.zero_grad(set_to_none=False)": lambda model, opt: opt.zero_grad(set_to_none=False),
}


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("discard", list(DISCARDS))
def test_discarded_gradients_are_not_applied(sparse, discard):
    """A NaN micro-batch thrown away between backward and step() leaves no trace (as in torch)."""
    torch.manual_seed(0)
    model = TinyMLP()
    twin = copy.deepcopy(model)
    opt = lk.LIFTAdamW(model.parameters(), sparse_grad=sparse, **KW)
    ref = lk.LIFTAdamW(twin.parameters(), sparse_grad=sparse, **KW)
    g = torch.Generator().manual_seed(5)
    for _ in range(5):  # across a refresh (update_interval=3)
        x, y = make_batch(generator=g)
        (_loss(model, x, y) * float("nan")).backward()
        DISCARDS[discard](model, opt)
        _loss(model, x, y).backward()
        opt.step()
        DISCARDS[discard](model, opt)
        _loss(twin, x, y).backward()
        ref.step()
        ref.zero_grad()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.isfinite(p).all()
        assert torch.equal(p, q)


def test_gradients_not_cleared_across_a_refresh_fail_loudly():
    """torch sums gradients of steps never cleared; gathered ones of an old selection cannot be."""
    model = TinyMLP()
    opt = lk.LIFTAdamW(model.parameters(), sparse_grad=True, **dict(KW, update_interval=2))
    x, y = make_batch()
    _loss(model, x, y).backward()
    opt.step()  # step 1; step 2 re-selects
    with pytest.raises(RuntimeError, match="never cleared; call zero_grad\\(\\) after every step"):
        _loss(model, x, y).backward()
