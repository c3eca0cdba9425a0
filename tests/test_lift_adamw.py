"""LIFTAdamW semantics: Algorithm 1 of the paper, torch.optim.AdamW on the selected entries."""
import copy
import io

import pytest
import torch

import lift_kernels as lk
from lift_kernels import ops
from lift_kernels.optim.selection import select, selection_generator
from lift_kernels.reference import topk_flat_indices
from helpers import TinyMLP, loss_step, make_batch, selected_mask


def _run(model, opt, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    batches = [make_batch(generator=g) for _ in range(steps)]
    return [loss_step(model, opt, x, y) for x, y in batches]


def test_density_one_equals_torch_adamw():
    torch.manual_seed(0)
    model = TinyMLP()
    ref = copy.deepcopy(model)
    hp = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05)
    opt = lk.LIFTAdamW(model.parameters(), density=1.0, lra_rank=4, update_interval=3, **hp)
    ref_opt = torch.optim.AdamW(ref.parameters(), **hp)
    _run(model, opt, 12)
    _run(ref, ref_opt, 12)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


class DenseMaskOracle:
    """Algorithm 1 written literally with dense masks and dense moments (test oracle only)."""

    def __init__(self, params, k, interval, hp):
        self.params, self.k, self.interval, self.hp = list(params), k, interval, hp
        self.t = 0
        self.masks = [None] * len(self.params)
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self):
        self.t += 1
        b1, b2 = self.hp["betas"]
        lr, wd, eps = self.hp["lr"], self.hp["weight_decay"], self.hp["eps"]
        for i, p in enumerate(self.params):
            if self.masks[i] is None or self.t % self.interval == 0:
                idx = topk_flat_indices(p.abs(), self.k[i]).long()  # selector="magnitude"
                new = torch.zeros(p.numel(), dtype=torch.bool)
                new[idx] = True
                new = new.view_as(p)
                self.m[i][~new] = 0  # lines 7-11: moments survive only where selected before and after
                self.v[i][~new] = 0
                self.masks[i] = new
            M, g = self.masks[i], p.grad
            self.m[i][M] = b1 * self.m[i][M] + (1 - b1) * g[M]
            self.v[i][M] = b2 * self.v[i][M] + (1 - b2) * g[M] ** 2
            mhat = self.m[i][M] / (1 - b1**self.t)
            vhat = self.v[i][M] / (1 - b2**self.t)
            p[M] = p[M] * (1 - lr * wd) - lr * mhat / (vhat.sqrt() + eps)

    def zero_grad(self):
        for p in self.params:
            p.grad = None


def test_refresh_carries_moments_like_algorithm_1():
    torch.manual_seed(0)
    model = TinyMLP()
    oracle_model = copy.deepcopy(model)
    hp = dict(lr=5e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    weights = [model.up.weight, model.down.weight]
    opt = lk.LIFTAdamW([{"params": weights, "lift": True}], rank=2, update_interval=3,
                       selector="magnitude", **hp)
    oweights = [oracle_model.up.weight, oracle_model.down.weight]
    k = [min((p.shape[0] + p.shape[1]) * 2, p.numel()) for p in oweights]
    oracle = DenseMaskOracle(oweights, k, 3, hp)
    for p in oracle_model.parameters():
        if all(p is not w for w in oweights):
            p.requires_grad_(False)
    for p in model.parameters():
        if all(p is not w for w in weights):
            p.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    changed = False
    for t in range(1, 13):
        x, y = make_batch(generator=g)
        before = selected_mask(model.up.weight, opt) if t > 1 else None
        loss_step(model, opt, x, y)
        oracle.zero_grad()
        torch.nn.functional.mse_loss(oracle_model(x), y).backward()
        oracle.step()
        if before is not None and not torch.equal(before, selected_mask(model.up.weight, opt)):
            changed = True
        for p, q, M in zip(weights, oweights, oracle.masks):
            assert torch.equal(selected_mask(p, opt), M), f"selection differs at step {t}"
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert changed, "the test must exercise a refresh that changes the selection"


def test_selection_happens_before_step_1_and_every_interval(monkeypatch):
    calls = []
    real = ops.principal_weights

    def spy(W, *args, **kwargs):
        calls.append(opt.state[model.up.weight].get("step", 0) + 1)  # the step this selection serves
        return real(W, *args, **kwargs)

    monkeypatch.setattr(ops, "principal_weights", spy)
    torch.manual_seed(0)
    model = TinyMLP()
    opt = lk.LIFTAdamW([model.up.weight], rank=1, lra_rank=3, update_interval=4)
    before = model.up.weight.detach().clone()
    x, y = make_batch()
    loss_step(model, opt, x, y)
    # the first selection was made from the weights before the update
    expected = lk.principal_weights(before, opt.state[model.up.weight]["idx"].numel(), 3,
                                    generator=selection_generator(opt.selection_seed, 0, 1))
    assert torch.equal(opt.state[model.up.weight]["idx"], expected)
    for _ in range(10):
        loss_step(model, opt, x, y)
    assert calls == [1, 4, 8]


def test_only_selected_entries_change_and_state_is_length_k():
    torch.manual_seed(0)
    model = TinyMLP()
    w0 = model.up.weight.detach().clone()
    opt = lk.LIFTAdamW(model.parameters(), lr=1e-2, rank=3, lra_rank=2, update_interval=100)
    _run(model, opt, 3)
    st = opt.state[model.up.weight]
    k = (37 + 23) * 3
    assert st["idx"].dtype == torch.int32 and st["idx"].numel() == k
    assert st["exp_avg"].shape == (k,) and st["exp_avg"].dtype == torch.float32
    assert torch.all(st["idx"][1:] > st["idx"][:-1])
    M = selected_mask(model.up.weight, opt)
    assert torch.equal(model.up.weight[~M], w0[~M])
    assert not torch.equal(model.up.weight[M], w0[M])
    # 1-D tensors (biases, norm) were trained densely, as AdamW
    assert opt.state[model.up.bias]["exp_avg"].shape == model.up.bias.shape


@pytest.mark.parametrize("selector", ["lift", "magnitude", "random", "gradient"])
def test_selectors_pick_what_they_say(selector):
    torch.manual_seed(0)
    model = TinyMLP()
    w0 = model.up.weight.detach().clone()
    opt = lk.LIFTAdamW([model.up.weight], rank=1, lra_rank=3, selector=selector, seed=7)
    x, y = make_batch()
    model.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    grad = model.up.weight.grad.clone()
    opt.step()
    idx = opt.state[model.up.weight]["idx"]
    k = idx.numel()
    if selector == "magnitude":
        assert torch.equal(idx, topk_flat_indices(w0.abs(), k))
    elif selector == "gradient":
        assert torch.equal(idx, topk_flat_indices(grad.abs(), k))
    elif selector == "lift":
        assert torch.equal(idx, lk.principal_weights(w0, k, 3, generator=selection_generator(opt.selection_seed, 0, 1)))
    else:  # random: reproducible from the seed, and not the magnitude selection
        again = lk.LIFTAdamW([torch.nn.Parameter(w0.clone())], rank=1, selector="random", seed=7)
        p = again.param_groups[0]["params"][0]
        p.grad = grad
        again.step()
        assert torch.equal(idx, again.state[p]["idx"])
        assert not torch.equal(idx, topk_flat_indices(w0.abs(), k))


def test_largest_false_selects_smallest():
    W = torch.nn.Parameter(torch.randn(20, 30))
    opt = lk.LIFTAdamW([W], rank=1, selector="magnitude", largest=False)
    W.grad = torch.randn_like(W)
    w0 = W.detach().clone()
    opt.step()
    assert torch.equal(opt.state[W]["idx"], topk_flat_indices(w0.abs(), 50, largest=False))


def test_density_budget_and_zero_budget_is_refused():
    W = torch.nn.Parameter(torch.randn(10, 10))
    V = torch.nn.Parameter(torch.randn(10, 10))
    opt = lk.LIFTAdamW([{"params": [W], "density": 0.05}], lra_rank=2)
    W.grad = torch.randn_like(W)
    opt.step()
    assert opt.state[W]["idx"].numel() == 5
    # round(0.001 * 100) = 0: such a weight would silently never train
    with pytest.raises(ValueError, match=r"density=0.001 selects .* = 0 entries of v \(shape 10x10\)"):
        lk.LIFTAdamW([{"params": [V], "density": 0.001, "param_names": ["v"]}], lra_rank=2)


@pytest.mark.parametrize("shape,density,k", [
    ((576, 576), 0.05, 16589),  # 16588.8: rounded, not truncated
    ((7, 9), 0.05, 3),          # 3.15: rounded, not raised
    ((10, 30), 0.15, 45),       # an exact product stays exact
])
def test_density_budget_is_rounded_to_the_nearest_count(shape, density, k):
    W = torch.nn.Parameter(torch.randn(*shape))
    opt = lk.LIFTAdamW([{"params": [W], "density": density}], selector="magnitude")
    W.grad = torch.randn_like(W)
    opt.step()
    assert opt.state[W]["idx"].numel() == k
    assert opt.state[W]["exp_avg"].numel() == k


@pytest.mark.parametrize("sparse", [False, True])
def test_clip_grad_norm_below_max_norm_leaves_the_gradients_bit_identical(sparse):
    """A total norm under max_norm must not scale the gradients (the coefficient is clamped to 1):
    the clipped run and an unclipped one take bit-identical steps, through a refresh."""
    torch.manual_seed(0)
    model = TinyMLP()
    twin = copy.deepcopy(model)
    kw = dict(lr=1e-2, rank=2, lra_rank=3, update_interval=2, selector="random", sparse_grad=sparse)
    opt, opt2 = lk.LIFTAdamW(model.parameters(), **kw), lk.LIFTAdamW(twin.parameters(), **kw)
    g = torch.Generator().manual_seed(3)
    for x, y in [make_batch(generator=g) for _ in range(4)]:
        for m, o in ((model, opt), (twin, opt2)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
        grads = [p.grad.clone() for p in model.parameters()] if not sparse else None
        total = opt.clip_grad_norm_(1e6)
        assert 0 < float(total) < 1e6
        if grads is not None:
            for p, before in zip(model.parameters(), grads):
                assert torch.equal(p.grad, before)
        opt.step()
        opt2.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("lra_rank", [8, 9, 64])
@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("svd", ["fast", "exact"])
def test_lra_rank_reaching_min_m_n_selects_by_magnitude(lra_rank, largest, svd):
    """The best approximation of rank >= min(m, n) is W itself: LIFT's selection is then the top-k of
    |W| (a 2 x 128 classifier head under lra_rank=64), in the optimizer and in lk.select alike."""
    W = torch.nn.Parameter(torch.randn(8, 12))
    opt = lk.LIFTAdamW([W], rank=1, lra_rank=lra_rank, largest=largest, svd=svd)
    w0 = W.detach().clone()
    W.grad = torch.randn_like(W)
    opt.step()
    want = topk_flat_indices(w0.abs(), 20, largest=largest)
    assert torch.equal(opt.state[W]["idx"], want)
    assert torch.equal(select(w0, 20, lra_rank=lra_rank, largest=largest, svd=svd), want)
    stacked = torch.stack([w0, -2 * w0])  # a stack of matrices of one shape, as refreshes select them
    assert torch.equal(select(stacked, 20, lra_rank=lra_rank, largest=largest, svd=svd), torch.stack([want, want]))


def _checkpoint_roundtrip(opt):
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("selector", ["lift", "random"])
def test_resume_from_checkpoint_is_bit_exact(selector):
    """The resumed optimizer is built with another seed: the checkpoint's selection seed must win
    (the selections after the resume, at steps 8 and 12, draw from it)."""
    torch.manual_seed(0)
    model = TinyMLP()
    start = copy.deepcopy(model.state_dict())
    kw = dict(lr=1e-2, rank=2, lra_rank=3, update_interval=4, seed=5, selector=selector)
    opt = lk.LIFTAdamW(model.parameters(), **kw)
    g = torch.Generator().manual_seed(9)
    batches = [make_batch(generator=g) for _ in range(14)]
    for x, y in batches:
        loss_step(model, opt, x, y)
    straight = copy.deepcopy(model.state_dict())

    model2 = TinyMLP()
    model2.load_state_dict(start)
    opt2 = lk.LIFTAdamW(model2.parameters(), **kw)
    for x, y in batches[:6]:  # stop after the refresh at step 4, before the one at 8
        loss_step(model2, opt2, x, y)
    saved_model, saved_opt = copy.deepcopy(model2.state_dict()), _checkpoint_roundtrip(opt2)
    model3 = TinyMLP()
    model3.load_state_dict(saved_model)
    opt3 = lk.LIFTAdamW(model3.parameters(), **{**kw, "seed": 77})
    opt3.load_state_dict(saved_opt)
    assert opt3.selection_seed == 5
    for x, y in batches[6:]:
        loss_step(model3, opt3, x, y)
    for key in straight:
        assert torch.equal(straight[key], model3.state_dict()[key]), key


def test_load_state_dict_keeps_lift_dtypes_for_bf16_weights():
    W = torch.nn.Parameter(torch.randn(16, 12, dtype=torch.bfloat16))
    opt = lk.LIFTAdamW([W], rank=1, lra_rank=2)
    W.grad = torch.randn_like(W)
    opt.step()
    opt2 = lk.LIFTAdamW([W], rank=1, lra_rank=2)
    opt2.load_state_dict(_checkpoint_roundtrip(opt))
    st = opt2.state[W]
    assert st["idx"].dtype == torch.int32
    assert st["exp_avg"].dtype == torch.float32 and st["exp_avg_sq"].dtype == torch.float32
    assert torch.equal(st["idx"], opt.state[W]["idx"])


def test_checkpoint_of_another_model_is_refused_and_nothing_changes():
    W = torch.nn.Parameter(torch.randn(16, 12))
    opt = lk.LIFTAdamW([W], rank=1, lra_rank=2)
    W.grad = torch.randn_like(W)
    opt.step()
    other = torch.nn.Parameter(torch.randn(12, 16))
    opt_other = lk.LIFTAdamW([other], rank=1, lra_rank=2)
    other.grad = torch.randn_like(other)
    opt_other.step()
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="checkpoint mismatch.*load a checkpoint of this model"):
        opt.load_state_dict(opt_other.state_dict())
    after = opt.state_dict()
    assert torch.equal(after["state"][0]["idx"], before["state"][0]["idx"])


def test_schedulers_closures_zero_grad_and_add_param_group():
    torch.manual_seed(0)
    model = TinyMLP()
    opt = lk.LIFTAdamW([model.up.weight], lr=1e-2, rank=1, lra_rank=2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    x, y = make_batch()

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-3)
    opt.add_param_group({"params": [model.down.weight], "rank": 2, "lr": 0.0})
    w_down = model.down.weight.detach().clone()
    opt.step(closure)
    assert opt.state[model.down.weight]["idx"].numel() == (11 + 37) * 2
    assert torch.equal(model.down.weight, w_down)  # lr 0 in that group is honoured
    opt.zero_grad()
    assert model.up.weight.grad is None


def test_lr_zero_group_and_scheduler_per_group():
    """Each group follows its own schedule (LambdaLR with one function per group), and the weights
    follow torch.optim.AdamW's trajectory under the same groups and schedules; a group at lr 0 stays put."""
    torch.manual_seed(0)
    weights = [torch.randn(8, 8) for _ in range(3)]
    ours = [torch.nn.Parameter(w.clone()) for w in weights]
    theirs = [torch.nn.Parameter(w.clone()) for w in weights]
    lrs = [0.1, 0.05, 0.0]
    schedules = [lambda t: 0.5 ** t, lambda t: min(1.0, (t + 1) / 3), lambda t: 1.0]
    # rank 8 on 8x8 matrices selects every entry, so LIFT's step is AdamW's
    opt = lk.LIFTAdamW([{"params": [p], "lr": lr} for p, lr in zip(ours, lrs)], rank=8, lra_rank=2)
    ref = torch.optim.AdamW([{"params": [p], "lr": lr} for p, lr in zip(theirs, lrs)], betas=(0.9, 0.95),
                            weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedules)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref, schedules)
    for t in range(6):
        for group, lr, f in zip(opt.param_groups, lrs, schedules):
            assert group["lr"] == pytest.approx(lr * f(t))  # its own schedule, not another group's
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(8, 8)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
        sched.step()
        ref_sched.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
    assert torch.equal(ours[2], weights[2])  # lr 0: not one entry moved
    assert not torch.equal(ours[0], weights[0]) and not torch.equal(ours[1], weights[1])
    assert sched.get_last_lr() == pytest.approx([lr * f(6) for lr, f in zip(lrs, schedules)])


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=0), "rank must be an integer >= 1"),
    (dict(lra_rank=0), "lra_rank must be an integer >= 1"),
    (dict(density=0.0), "density must be in"),
    (dict(density=1.5), "density must be in"),
    (dict(selector="snip"), "selector must be one of"),
    (dict(svd="approx"), "svd must be one of"),
    (dict(update_interval=0), "update_interval must be"),
    (dict(lr=-1.0), "lr must be >= 0"),
    (dict(betas=(0.9, 1.0)), "betas must"),
])
def test_bad_hyperparameters_name_the_parameter(kwargs, match):
    W = torch.nn.Parameter(torch.randn(8, 12))
    with pytest.raises(ValueError, match=match):
        lk.LIFTAdamW([W], **kwargs)


def test_non_2d_weight_in_lift_group_is_refused():
    b = torch.nn.Parameter(torch.randn(8))
    with pytest.raises(ValueError, match="LIFT weights must be 2-D.*lift=False"):
        lk.LIFTAdamW([{"params": [b], "lift": True, "param_names": ["up.bias"]}])
    with pytest.raises(ValueError, match="up.bias"):
        lk.LIFTAdamW([{"params": [b], "lift": True, "param_names": ["up.bias"]}])
