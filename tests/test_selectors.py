"""The selectors of lift_kernels.optim.selection: movement (added as one function), the registry,
and the row restriction the sharded (FSDP2) path uses. That gradient scorers keep the dense gradient
on selecting steps only is tested with the "gradient" selector in test_sparse_grad.py."""
import copy

import pytest
import torch

import lift_kernels as lk
from helpers import TinyMLP, make_batch
from lift_kernels.optim import selection
from lift_kernels.reference import principal_weights, topk_flat_indices


def _grad_of(model, x, y):
    model.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    return model.up.weight.grad.clone()


@pytest.mark.parametrize("largest", [True, False])
def test_movement_picks_the_largest_minus_w_times_grad(largest):
    torch.manual_seed(0)
    model = TinyMLP()
    w0 = model.up.weight.detach().clone()
    opt = lk.LIFTAdamW([model.up.weight], rank=1, selector="movement", largest=largest)
    x, y = make_batch()
    grad = _grad_of(copy.deepcopy(model), x, y)
    model.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    idx = opt.state[model.up.weight]["idx"]
    assert torch.equal(idx, topk_flat_indices(-(w0 * grad), idx.numel(), largest))
    # not the magnitude selection, nor the gradient selection: the product decides
    assert not torch.equal(idx, topk_flat_indices(w0.abs(), idx.numel(), largest))
    assert not torch.equal(idx, topk_flat_indices(grad.abs(), idx.numel(), largest))


def test_movement_sparse_grad_mode_equals_dense_mode():
    torch.manual_seed(0)
    model = TinyMLP()
    twin = copy.deepcopy(model)
    kw = dict(lr=1e-2, rank=2, lra_rank=3, update_interval=3, selector="movement", weight_decay=0.01)
    opts = [lk.LIFTAdamW(model.parameters(), **kw), lk.LIFTAdamW(twin.parameters(), sparse_grad=True, **kw)]
    g = torch.Generator().manual_seed(4)
    batches = [make_batch(n=18, generator=g) for _ in range(7)]
    for m, opt in zip((model, twin), opts):
        for x, y in batches:
            for xs, ys in zip(x.chunk(3), y.chunk(3)):  # micro-batches accumulate
                (torch.nn.functional.mse_loss(m(xs), ys) / 3).backward()
            opt.clip_grad_norm_(0.05)
            opt.step()
            opt.zero_grad()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    w = model.up.weight
    assert torch.equal(opts[0].state[w]["idx"], opts[1].state[twin.up.weight]["idx"])
    assert opts[0].state[w]["selected_at"] == 6  # re-selected (at steps 3 and 6)


@pytest.mark.parametrize("name", ["movement", "gradient"])
def test_gradient_scorers_without_a_gradient_are_refused(name):
    W = torch.nn.Parameter(torch.randn(8, 12))
    opt = lk.LIFTAdamW([W], rank=1, lra_rank=2, selector=name)
    with pytest.raises(RuntimeError, match=f"selector='{name}' needs the dense gradient of the selecting step"):
        opt._select_due(opt.param_groups[0], [W])  # the one entry to selection, with W.grad None
    assert "idx" not in opt.state[W]


def test_a_selector_is_one_registered_function(monkeypatch):
    monkeypatch.setattr(selection, "SELECTORS", dict(selection.SELECTORS))

    @selection.selector("column_order")
    def column_order(x):  # prefer entries of later columns, then later rows
        return torch.arange(x.W.numel(), dtype=torch.float32).reshape(x.W.shape)

    W = torch.nn.Parameter(torch.randn(6, 10))
    opt = lk.LIFTAdamW([W], rank=1, lra_rank=2, selector="column_order")
    W.grad = torch.randn_like(W)
    opt.step()
    k = (6 + 10) * 1
    assert torch.equal(opt.state[W]["idx"], torch.arange(60 - k, 60, dtype=torch.int32))
    with pytest.raises(ValueError, match="selector must be one of .*column_order"):
        lk.LIFTAdamW([W], selector="row_order")


def test_lift_op_equals_ranking_the_lift_score():
    """The fused op the single-process path calls and the score the sharded path ranks agree."""
    W = torch.randn(30, 20, generator=torch.Generator().manual_seed(1))
    group = dict(lra_rank=3, svd="exact", largest=True, selector="lift")
    x = selection.Matrices(W, None, group, torch.Generator())
    assert torch.equal(topk_flat_indices(selection.lift(x), 50), principal_weights(W, 50, 3, "exact"))


@pytest.mark.parametrize("name", ["magnitude", "random", "gradient", "movement"])
def test_scores_of_a_block_of_rows_are_those_rows_of_the_whole_scores(name):
    """What the row-sharded path relies on: a selector run on rows [r0, r1) of a stack of matrices
    (with the stack's shape and the same generator) scores them as the whole run does."""
    g = torch.Generator().manual_seed(2)
    W, grad = torch.randn(3, 12, 7, generator=g), torch.randn(3, 12, 7, generator=g)
    group = dict(lra_rank=2, svd="exact", largest=True, selector=name)
    score = selection.SELECTORS[name].score
    whole = score(selection.Matrices(W, grad, group, torch.Generator().manual_seed(9)))
    rows = slice(5, 9)
    part = score(selection.Matrices(W[:, rows], grad[:, rows], group, torch.Generator().manual_seed(9),
                                    shape=tuple(W.shape), rows=rows))
    assert torch.equal(part, whole[:, rows])


def test_lift_score_of_a_matrix_thinner_than_lra_rank_is_its_magnitude():
    """The row-block path (a sharded weight scores its rows) agrees with the op: lra_rank >= min(m, n)
    scores |W|, with no low-rank factors of a rank the matrix does not have."""
    W = torch.randn(2, 2, 16)
    group = selection.standalone_group(lra_rank=8)
    for rows in (slice(None), slice(0, 1)):
        x = selection.Matrices(W[:, rows], None, group, torch.Generator().manual_seed(1), shape=tuple(W.shape),
                               rows=rows)
        assert torch.equal(selection.SELECTORS["lift"].score(x), W[:, rows].abs())


def test_budget_and_its_checks():
    assert selection.budget((10, 20), 2, None) == 60
    assert selection.budget((4, 5), 9, None) == 20  # capped at m*n
    assert selection.budget((10, 20), 2, 0.05) == 10
    options = dict(selector="lift", svd="fast", lra_rank=9, rank=1, density=None, update_interval=5, largest=True)
    selection.check_selection(options)
    selection.check_selection(options, (8, 12), "w")  # lra_rank 9 >= min(m, n): selects by |W|
    with pytest.raises(ValueError, match="selects round"):
        selection.check_selection({**options, "selector": "magnitude", "density": 1e-4}, (8, 12), "w")
