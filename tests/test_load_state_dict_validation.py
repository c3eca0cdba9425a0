"""LIFTAdamW.load_state_dict refuses foreign or damaged state dicts before anything changes."""
import copy
import io

import pytest
import torch

import lift_kernels as lk
from helpers import TinyMLP, loss_step, make_batch

KW = dict(lr=1e-2, rank=2, lra_rank=3, update_interval=3)


def _trained(**kw):
    torch.manual_seed(0)
    model = TinyMLP()
    opt = lk.LIFTAdamW(model.parameters(), **{**KW, **kw})
    x, y = make_batch()
    for _ in range(2):
        loss_step(model, opt, x, y)
    return model, opt


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _refused_and_unchanged(model, opt, sd, match):
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert _same(opt.state_dict(), before)
    loss_step(model, opt, *make_batch())  # and the optimizer still works


def test_torch_adamw_state_dict_is_refused():
    model, opt = _trained()
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_step(model, adamw, *make_batch())
    _refused_and_unchanged(model, opt, _roundtrip(adamw.state_dict()), "not a LIFTAdamW state dict")
    sd = _roundtrip(adamw.state_dict())
    sd["lift_seed"] = 0  # even with the seed key, its groups lack LIFT's options
    _refused_and_unchanged(model, opt, sd, r"lacks \['rank'")


def _up_state(sd):
    return sd["state"][0]  # up.weight is the first parameter of TinyMLP


DAMAGE = {
    "negative index": (lambda s: s["idx"].__setitem__(0, -1), "indices must lie in"),
    "index out of range": (lambda s: s["idx"].__setitem__(-1, 37 * 23), "indices must lie in"),
    "unsorted indices": (lambda s: s.__setitem__("idx", s["idx"].flip(0).contiguous()), "sorted and distinct"),
    "duplicate index": (lambda s: s["idx"].__setitem__(1, int(s["idx"][0])), "sorted and distinct"),
    "float indices": (lambda s: s.__setitem__("idx", s["idx"].float()), "1-D int32"),
    "int64 indices": (lambda s: s.__setitem__("idx", s["idx"].long()), "1-D int32"),
    "short exp_avg": (lambda s: s.__setitem__("exp_avg", s["exp_avg"][:-1]), "exp_avg must be an fp32 vector"),
    "fp16 exp_avg_sq": (lambda s: s.__setitem__("exp_avg_sq", s["exp_avg_sq"].half()), "exp_avg_sq must be an fp32"),
    "negative exp_avg_sq": (lambda s: s["exp_avg_sq"].__setitem__(0, -1.0), "negative or NaN"),
    "missing exp_avg": (lambda s: s.pop("exp_avg"), "exp_avg is missing"),
    "master of wrong length": (lambda s: s.__setitem__("master", torch.zeros(3)), "master must be an fp32"),
    "negative step": (lambda s: s.__setitem__("step", -1), "step must be an integer >= 0"),
    "other shape": (lambda s: s.__setitem__("shape", (23, 37)), "checkpoint mismatch"),
    "dense state": (lambda s: [s.pop(k) for k in ("idx", "shape")], "the saved state is dense AdamW's"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_lift_state_is_refused_and_nothing_changes(damage):
    model, opt = _trained()
    sd = _roundtrip(opt.state_dict())
    change, match = DAMAGE[damage]
    change(_up_state(sd))
    _refused_and_unchanged(model, opt, sd, match)


@pytest.mark.parametrize("key,value,match", [
    ("lr", float("nan"), "lr must be >= 0"),
    ("betas", (0.9,), "betas must be a pair"),
    ("rank", 0, "rank must be an integer"),
])
def test_bad_saved_hyperparameters_are_refused(key, value, match):
    model, opt = _trained()
    sd = _roundtrip(opt.state_dict())
    sd["param_groups"][0][key] = value
    _refused_and_unchanged(model, opt, sd, match)


def test_lift_state_for_a_dense_parameter_is_refused():
    model, opt = _trained()
    sd = _roundtrip(opt.state_dict())
    sd["state"][1] = _up_state(sd)  # up.bias (dense) given up.weight's LIFT state
    _refused_and_unchanged(model, opt, sd, "LIFT state but this parameter is trained densely")


def test_good_checkpoint_still_loads_and_counts_skipped_steps():
    model, opt = _trained(skip_nonfinite=True)
    opt.skipped_steps = 3
    sd = _roundtrip(opt.state_dict())
    fresh = lk.LIFTAdamW(model.parameters(), **KW)
    fresh.load_state_dict(sd)
    assert fresh.skipped_steps == 3
    assert _same(fresh.state_dict(), opt.state_dict())
