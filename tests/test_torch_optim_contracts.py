"""LIFTAdamW keeps torch.optim's contracts, or refuses clearly where an option is given.

Copies and pickles work, state dicts load twice (torch's own load runs __setstate__, which adds
defaults), load-state-dict hooks run in torch's order and see LIFT's dtypes, AdamW's options behave
as in AdamW (maximize, foreach, fused, tensor betas) or are refused at construction, float64 weights
are refused before any state changes, torch's add_param_group usage works after lift_param_groups,
and next_step() is the optimizer's step.
"""
import copy
import io
import pickle

import pytest
import torch

import lift_kernels as lk
from helpers import TinyMLP, make_batch


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [make_batch(generator=g) for _ in range(n)]


def _train(model, opt, batches, sign=1.0):
    for x, y in batches:
        opt.zero_grad()
        (sign * torch.nn.functional.mse_loss(model(x), y)).backward()
        opt.step()


def _opt(model, **kw):
    kw = {"lr": 1e-2, "rank": 2, "lra_rank": 3, "update_interval": 3, "seed": 4, **kw}
    return lk.LIFTAdamW(model.parameters(), **kw)


def _same(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_and_pickle_give_an_optimizer_that_continues_the_run(sparse, how):
    """A copy (with its model: deepcopy of both together, or a pickle of both) trains exactly as the
    original goes on training, through refreshes, with its own hooks on its own weights."""
    torch.manual_seed(0)
    model = TinyMLP()
    opt = _opt(model, sparse_grad=sparse, selector="random", skip_nonfinite=True)
    batches = _batches(8)
    _train(model, opt, batches[:4])
    opt.skipped_steps = 2
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert opt2.sparse_grad is sparse and opt2.skip_nonfinite and opt2.skipped_steps == 2
    assert opt2.selection_seed == 4 and opt2.selection_group == "world"
    _train(model, opt, batches[4:])
    _train(model2, opt2, batches[4:])  # refreshes at steps 6 (selection in the copy's hooks)
    _same(model, model2)
    p, q = model.up.weight, model2.up.weight
    assert torch.equal(opt.state[p]["idx"], opt2.state[q]["idx"])
    if sparse:
        assert type(q.grad).__name__ == "GatheredGrad"  # the copy's own hooks gathered it


def test_a_copy_of_the_optimizer_alone_trains_its_own_weights():
    torch.manual_seed(0)
    model = TinyMLP()
    opt = _opt(model)
    _train(model, opt, _batches(2))
    opt2 = copy.deepcopy(opt)
    copied = opt2.param_groups[0]["params"]
    assert all(c is not p for c, p in zip(copied, model.parameters()))
    before = [c.detach().clone() for c in copied]
    for c in copied:
        c.grad = torch.ones_like(c)
    opt2.step()
    assert any(not torch.equal(b, c) for b, c in zip(before, copied))


def test_state_dict_loads_twice_and_into_a_copy():
    """torch's load_state_dict ends with __setstate__, which adds `differentiable` to the defaults:
    a second load (accelerate's wrapper loads once itself, then Trainer's resume) must still work."""
    torch.manual_seed(0)
    model = TinyMLP()
    opt = _opt(model, selector="random")
    batches = _batches(7)
    _train(model, opt, batches[:4])
    sd = copy.deepcopy(opt.state_dict())
    model_sd = copy.deepcopy(model.state_dict())
    _train(model, opt, batches[4:])
    model2 = TinyMLP()
    model2.load_state_dict(model_sd)
    opt2 = _opt(model2, seed=9, selector="random")  # the checkpoint's seed 4 must win (refresh at step 7)
    opt2.load_state_dict(sd)
    opt2.load_state_dict(copy.deepcopy(sd))  # twice
    opt3 = copy.deepcopy(opt2)
    opt3.load_state_dict(sd)  # into a copy
    _train(model2, opt2, batches[4:])
    _same(model, model2)


def test_load_state_dict_hooks_run_in_torchs_order_and_see_lift_dtypes():
    torch.manual_seed(0)
    model = TinyMLP()
    opt = _opt(model)
    _train(model, opt, _batches(2))
    sd = opt.state_dict()
    opt2 = _opt(TinyMLP())
    seen = {}

    def pre(o, state_dict):  # what it returns is what is checked and loaded
        state_dict = copy.deepcopy(state_dict)
        for g in state_dict["param_groups"]:
            g["lr"] = 0.125
        return state_dict

    def post(o):
        w = o.param_groups[0]["params"][0]
        seen["idx"] = o.state[w]["idx"].dtype
        seen["lr"] = o.param_groups[0]["lr"]

    opt2.register_load_state_dict_pre_hook(pre)
    opt2.register_load_state_dict_post_hook(post)
    opt2.load_state_dict(sd)
    assert seen == {"idx": torch.int32, "lr": 0.125}

    def bad(o, state_dict):
        state_dict = copy.deepcopy(state_dict)
        state_dict["state"][0]["idx"] = state_dict["state"][0]["idx"].flip(0)  # unsorted
        return state_dict

    opt3 = _opt(TinyMLP())
    opt3.register_load_state_dict_pre_hook(bad)
    with pytest.raises(ValueError, match="sorted and distinct"):  # the hook's result is what is checked
        opt3.load_state_dict(sd)
    assert not opt3.state


def test_float64_weights_are_refused_where_given_and_before_any_state_changes():
    W = torch.nn.Parameter(torch.randn(12, 10, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"float64.*lift=False"):
        lk.LIFTAdamW([W], rank=1, lra_rank=2)
    opt = lk.LIFTAdamW([{"params": [W], "lift": False}])  # dense AdamW trains float64
    W.grad = torch.ones_like(W)
    opt.step()
    V = torch.nn.Parameter(torch.randn(12, 10))
    opt = lk.LIFTAdamW([V], rank=1, lra_rank=2)
    V.grad = torch.ones_like(V)
    opt.step()
    before = copy.deepcopy(opt.state[V])
    V.data = V.data.double()
    V.grad = torch.ones_like(V)
    with pytest.raises(ValueError, match=r"no longer fp32.*nothing was changed"):
        opt.step()
    assert opt.state[V]["step"] == before["step"] == 1
    assert torch.equal(opt.state[V]["exp_avg"], before["exp_avg"])


@pytest.mark.parametrize("sparse", [False, True])
def test_maximize_ascends_as_torch_adamw_does(sparse):
    """maximize=True on a loss L equals minimizing -L, bit for bit, per group; with every entry
    selected it is torch.optim.AdamW(maximize=True)."""
    torch.manual_seed(0)
    model = TinyMLP()
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    batches = _batches(7)
    opt = lk.LIFTAdamW([{"params": [ours.up.weight], "maximize": True},
                        {"params": [ours.down.weight, ours.up.bias], "lift": None, "maximize": True}],
                       lr=1e-2, rank=2, lra_rank=3, update_interval=3, sparse_grad=sparse)
    ref = lk.LIFTAdamW([{"params": [theirs.up.weight]}, {"params": [theirs.down.weight, theirs.up.bias]}],
                       lr=1e-2, rank=2, lra_rank=3, update_interval=3, sparse_grad=sparse)
    _train(ours, opt, batches, sign=-1.0)
    _train(theirs, ref, batches, sign=1.0)
    for name in ("up.weight", "down.weight", "up.bias"):
        assert torch.equal(ours.get_parameter(name), theirs.get_parameter(name)), name
    dense_ours, dense_theirs = copy.deepcopy(model), copy.deepcopy(model)
    opt = lk.LIFTAdamW(dense_ours.parameters(), lr=1e-2, density=1.0, lra_rank=3, maximize=True)
    ref = torch.optim.AdamW(dense_theirs.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0,
                            maximize=True)
    _train(dense_ours, opt, batches, sign=-1.0)
    _train(dense_theirs, ref, batches, sign=-1.0)
    for p, q in zip(dense_ours.parameters(), dense_theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("option", ["amsgrad", "capturable", "differentiable"])
def test_options_lift_does_not_implement_are_refused_by_name(option):
    model = TinyMLP()
    with pytest.raises(ValueError, match=f"{option}=True"):
        lk.LIFTAdamW(model.parameters(), lra_rank=2, **{option: True})
    opt = lk.LIFTAdamW([model.up.weight], rank=1, lra_rank=2, **{option: False})
    with pytest.raises(ValueError, match=f"{option}=True"):
        opt.add_param_group({"params": [model.down.weight], option: True})
    assert len(opt.param_groups) == 1


def test_foreach_and_fused_run_the_dense_part_and_are_checked():
    torch.manual_seed(0)
    model = TinyMLP()
    batches = _batches(4)
    runs = []
    for impl in ({}, {"foreach": True}, {"fused": True}):
        m = copy.deepcopy(model)
        _train(m, lk.LIFTAdamW(m.parameters(), lr=1e-2, rank=2, lra_rank=3, **impl), batches)
        runs.append(m)
    for m in runs[1:]:  # torch's three dense implementations agree to rounding, and so the runs
        for p, q in zip(m.parameters(), runs[0].parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cannot be set together"):
        lk.LIFTAdamW(model.parameters(), lra_rank=2, foreach=True, fused=True)
    with pytest.raises(ValueError, match="foreach must be None, True or False"):
        lk.LIFTAdamW(model.parameters(), lra_rank=2, foreach="yes")


def test_tensor_betas_train_as_float_betas():
    """One-element tensor betas are their values (an fp32 tensor holds 0.9 rounded to fp32)."""
    torch.manual_seed(0)
    model = TinyMLP()
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    batches = _batches(5)
    betas = (torch.tensor(0.9), torch.tensor(0.95))
    _train(a, lk.LIFTAdamW([a.up.weight, a.down.weight], lr=1e-2, rank=2, lra_rank=3, update_interval=3,
                           betas=betas), batches)
    _train(b, lk.LIFTAdamW([b.up.weight, b.down.weight], lr=1e-2, rank=2, lra_rank=3, update_interval=3,
                           betas=tuple(float(x) for x in betas)), batches)
    _same(a, b)
    with pytest.raises(ValueError, match="betas must be a pair"):
        lk.LIFTAdamW(model.parameters(), betas=(torch.tensor([0.9, 0.8]), 0.95))


def test_add_param_group_as_torch_documents_it_after_lift_param_groups():
    model = TinyMLP()
    groups = lk.lift_param_groups(model, target_modules=["up"])
    opt = lk.LIFTAdamW(groups, rank=1, lra_rank=2)
    model.down.weight.requires_grad_(True)
    opt.add_param_group({"params": [model.down.weight]})
    assert opt.is_lift(model.down.weight)
    assert opt.param_groups[-1]["param_names"] == ["param_groups[1]['params'][0]"]
    x, y = make_batch()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    assert opt.state[model.down.weight]["idx"].numel() == (37 + 11) * 1


def test_next_step_is_the_optimizers_step_when_a_weight_sat_out():
    torch.manual_seed(0)
    model = TinyMLP()
    opt = lk.LIFTAdamW([model.up.weight, model.down.weight], rank=1, lra_rank=2)
    assert opt.next_step() == 1
    for t in range(4):  # after the first step, the first weight gets no gradient for three steps
        if t == 0:
            model.up.weight.grad = torch.ones_like(model.up.weight)
        model.down.weight.grad = torch.ones_like(model.down.weight)
        opt.step()
        opt.zero_grad()
    assert opt.state[model.up.weight]["step"] == 1
    assert opt.next_step() == 5


def test_a_pickled_optimizer_refuses_a_process_group_clearly():
    """A ProcessGroup belongs to one process: copying an optimizer that holds one says what to do."""
    opt = lk.LIFTAdamW(TinyMLP().parameters(), lra_rank=2)
    opt._selection_group = object()  # what a ProcessGroup would be here (without init_process_group)
    with pytest.raises(TypeError, match="selection_group"):
        pickle.dumps(opt)


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_checkpoint_of_an_earlier_release_without_adamws_options_loads():
    """Groups saved before LIFTAdamW took maximize/foreach/... load with this optimizer's values."""
    torch.manual_seed(0)
    model = TinyMLP()
    opt = _opt(model)
    _train(model, opt, _batches(2))
    sd = _roundtrip(opt.state_dict())
    for g in sd["param_groups"]:
        for key in ("amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused"):
            del g[key]
    opt2 = _opt(TinyMLP(), maximize=False)
    opt2.load_state_dict(sd)
    assert all(g["maximize"] is False and g["fused"] is None for g in opt2.param_groups)
