"""Misuse gets a clear error naming the parameter (or, for non-finite steps, an explicit skip)."""
import copy

import pytest
import torch

import lift_kernels as lk
from helpers import TinyMLP, make_batch

KW = dict(lr=1e-2, rank=2, lra_rank=3, update_interval=3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=float("nan")), "lr must be >= 0 and finite"),
    (dict(lr=float("inf")), "lr must be >= 0 and finite"),
    (dict(weight_decay=float("nan")), "weight_decay must be >= 0 and finite"),
    (dict(eps=float("nan")), "eps must be >= 0 and finite"),
    (dict(betas=(0.9,)), r"betas must be a pair \(beta1, beta2\)"),
    (dict(betas=(float("nan"), 0.9)), "betas must be a pair"),
    (dict(rank=True), "rank must be an integer"),
    (dict(lra_rank=2.0), "lra_rank must be an integer"),
    (dict(update_interval=True), "update_interval must be an integer"),
    (dict(density=float("nan")), "density must be in"),
    (dict(seed=None), "seed must be an integer"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(selection_group="foo"), "selection_group must be 'world', None"),
    (dict(sparse_grad="yes"), "sparse_grad must be True or False"),
    (dict(skip_nonfinite=1), "skip_nonfinite must be True or False"),
    (dict(largest="no"), "largest must be True or False"),
    (dict(master_weights="auto"), "master_weights must be True, False or None"),
])
def test_bad_option_is_refused_by_name(kwargs, match):
    W = torch.nn.Parameter(torch.randn(8, 12))
    with pytest.raises(ValueError, match=match):
        lk.LIFTAdamW([W], **{**dict(lra_rank=2), **kwargs})


def _named(p, name):
    return [{"params": [p], "param_names": [name], "lift": True}]


def test_frozen_weight_in_sparse_mode_is_named():
    W = torch.nn.Parameter(torch.randn(8, 12), requires_grad=False)
    with pytest.raises(ValueError, match="layers.0.q_proj.weight is frozen .*unfreeze it"):
        lk.LIFTAdamW(_named(W, "layers.0.q_proj.weight"), lra_rank=2, sparse_grad=True)
    lk.LIFTAdamW(_named(W, "layers.0.q_proj.weight"), lra_rank=2)  # dense mode: as torch.optim, no grad, no step


def test_integer_and_meta_weights_are_refused_at_construction():
    ints = torch.nn.Parameter(torch.ones(8, 12, dtype=torch.int32), requires_grad=False)
    with pytest.raises(ValueError, match="w_int has dtype torch.int32"):
        lk.LIFTAdamW(_named(ints, "w_int"), lra_rank=2)
    meta = torch.nn.Parameter(torch.empty(8, 12, device="meta"))
    with pytest.raises(ValueError, match="w_meta is on the meta device"):
        lk.LIFTAdamW(_named(meta, "w_meta"), lra_rank=2)


@pytest.mark.parametrize("sparse", [False, True])
def test_weight_resized_between_steps_is_named(sparse):
    W = torch.nn.Parameter(torch.randn(8, 12))
    opt = lk.LIFTAdamW(_named(W, "w"), lra_rank=2, rank=1, sparse_grad=sparse)
    (W ** 2).sum().backward()
    opt.step()
    opt.zero_grad()
    W.data = torch.randn(16, 12)
    with pytest.raises(ValueError, match=r"w changed shape from \(8, 12\) to \(16, 12\)"):
        (W ** 2).sum().backward()
        opt.step()


def test_non_finite_weights_at_a_selection_name_the_weight():
    model = TinyMLP()
    opt = lk.LIFTAdamW(lk.lift_param_groups(model), **KW)
    with torch.no_grad():
        model.down.weight[0, 0] = float("nan")
    x, y = make_batch()
    with pytest.raises(ValueError, match=r"\['down.weight'\] contain NaN or inf at a selection step"):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("clip", [False, True])
def test_skip_nonfinite_skips_and_counts_the_step(sparse, clip):
    """An inf gradient (clipped or not) changes nothing and is not counted; the run continues
    exactly as if that micro-batch had never been seen."""
    torch.manual_seed(0)
    model = TinyMLP()
    twin = copy.deepcopy(model)
    opt = lk.LIFTAdamW(model.parameters(), sparse_grad=sparse, skip_nonfinite=True, **KW)
    ref = lk.LIFTAdamW(twin.parameters(), sparse_grad=sparse, **KW)
    g = torch.Generator().manual_seed(2)
    batches = [make_batch(generator=g) for _ in range(6)]
    for i, (x, y) in enumerate(batches):
        loss = torch.nn.functional.mse_loss(model(x), y)
        if i in (0, 3):  # before the first selection's step and before a refresh step
            bad = torch.nn.functional.mse_loss(model(x), y) * float("inf")
            bad.backward()
            if clip:
                opt.clip_grad_norm_(0.1)
            before = copy.deepcopy(opt.state_dict()["state"])
            opt.step()
            opt.zero_grad()
            after = opt.state_dict()["state"]
            for pid in before:
                for key in before[pid]:
                    v = before[pid][key]
                    assert torch.equal(v, after[pid][key]) if torch.is_tensor(v) else v == after[pid][key]
        loss.backward()
        if clip:
            opt.clip_grad_norm_(0.1)
        opt.step()
        opt.zero_grad()
        torch.nn.functional.mse_loss(twin(x), y).backward()
        if clip:
            ref.clip_grad_norm_(0.1)
        ref.step()
        ref.zero_grad()
    assert opt.skipped_steps == 2 and opt.state_dict()["lift_skipped_steps"] == 2
    assert opt.state[model.up.weight]["step"] == 6
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_inf_gradient_with_clipping_matches_torch_without_skip():
    """Without skip_nonfinite the result is torch's: NaN exactly where torch's AdamW puts it."""
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(8, 12))
    V = torch.nn.Parameter(W.detach().clone())
    opt = lk.LIFTAdamW([W], density=1.0, lra_rank=2, weight_decay=0.01)
    ref = torch.optim.AdamW([V], lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01)
    grad = torch.randn(8, 12)
    grad[2, 3] = float("inf")
    W.grad, V.grad = grad.clone(), grad.clone()
    torch.testing.assert_close(opt.clip_grad_norm_(1.0), torch.nn.utils.clip_grad_norm_([V], 1.0))
    opt.step()
    ref.step()
    assert torch.equal(torch.isnan(W), torch.isnan(V)) and int(torch.isnan(W).sum()) == 1


def test_refused_param_group_leaves_the_optimizer_as_it_was():
    W, V = torch.nn.Parameter(torch.randn(8, 12)), torch.nn.Parameter(torch.randn(8, 12))
    opt = lk.LIFTAdamW([W], lra_rank=2)
    with pytest.raises(ValueError, match="lr must be >= 0 and finite"):
        opt.add_param_group({"params": [V], "lr": float("nan")})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [V]})  # and the weight can still be added correctly
