"""The gradient hooks of LIFTAdamW hold it weakly, go away with it, and yield to a newer optimizer."""
import copy
import gc
import weakref

import pytest
import torch

import lift_kernels as lk
from helpers import TinyMLP, make_batch

KW = dict(lr=1e-2, rank=2, lra_rank=3, update_interval=3)


def _backward(model, x, y):
    torch.nn.functional.mse_loss(model(x), y).backward()


@pytest.mark.parametrize("sparse", [False, True])
def test_deleted_optimizer_is_collected_and_its_hooks_removed(sparse):
    model = TinyMLP()
    w = model.up.weight
    hooks_before = (len(w._backward_hooks or {}), len(w._post_accumulate_grad_hooks or {}))
    opt = lk.LIFTAdamW(model.parameters(), sparse_grad=sparse, **KW)
    ref = weakref.ref(opt)
    x, y = make_batch()
    _backward(model, x, y)
    opt.step()
    del opt
    gc.collect()
    assert ref() is None, "the hooks must not keep the optimizer alive"
    assert (len(w._backward_hooks or {}), len(w._post_accumulate_grad_hooks or {})) == hooks_before


def test_plain_adamw_after_a_deleted_sparse_optimizer_trains_every_entry():
    torch.manual_seed(0)
    model = TinyMLP()
    opt = lk.LIFTAdamW(model.parameters(), sparse_grad=True, **KW)
    x, y = make_batch()
    _backward(model, x, y)
    opt.step()
    opt.zero_grad()
    del opt
    gc.collect()
    plain = torch.optim.AdamW(model.parameters(), lr=1e-2)
    w0 = model.up.weight.detach().clone()
    _backward(model, x, y)
    assert type(model.up.weight.grad) is torch.Tensor
    plain.step()
    assert (model.up.weight != w0).all()


def test_plain_adamw_beside_a_live_sparse_optimizer_fails_loudly():
    model = TinyMLP()
    opt = lk.LIFTAdamW(model.parameters(), sparse_grad=True, **KW)  # noqa: F841 (alive)
    plain = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = make_batch()
    _backward(model, x, y)
    with pytest.raises(NotImplementedError, match="sparse_grad=True.*delete the sparse-gradient LIFTAdamW"):
        plain.step()


@pytest.mark.parametrize("sparse", [False, True])
def test_rebuilt_optimizer_trains_like_a_first_one(sparse):
    """A notebook cell run twice: the second LIFTAdamW on the same weights, the first still alive."""
    torch.manual_seed(0)
    model = TinyMLP()
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    batches = [make_batch(generator=g) for _ in range(7)]
    first = lk.LIFTAdamW(model.parameters(), sparse_grad=sparse, **KW)
    second = lk.LIFTAdamW(model.parameters(), sparse_grad=sparse, **KW)
    only = lk.LIFTAdamW(twin.parameters(), sparse_grad=sparse, **KW)
    for (x, y) in batches:
        for m, o in ((model, second), (twin, only)):
            _backward(m, x, y)
            o.step()
            o.zero_grad()
    assert not first.state  # the older optimizer's hooks stood aside
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_a_constructor_that_fails_halfway_leaves_the_working_optimizer_in_charge():
    torch.manual_seed(0)
    model = TinyMLP()
    opt = lk.LIFTAdamW(model.parameters(), sparse_grad=True, **KW)
    with pytest.raises(ValueError, match="rank must be an integer"):
        lk.LIFTAdamW([{"params": [model.up.weight]}, {"params": [model.down.weight], "rank": 0}],
                     sparse_grad=True, **{k: v for k, v in KW.items() if k != "rank"})
    x, y = make_batch()
    _backward(model, x, y)
    assert type(model.up.weight.grad).__name__ == "GatheredGrad"  # opt's hooks still act
    opt.step()
