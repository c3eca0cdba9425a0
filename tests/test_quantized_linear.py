"""LIFT over a bitsandbytes 4-bit/8-bit base (issue 20, item 1): LIFTQuantLinear computes with
dequant(base) + a sparse delta, its backward gives the dense autograd's gradients (the delta's only at
the selected slots), grow() keeps the parameter, state_dict/deepcopy/pickle keep it working, the base
is never modified, quantize_for_lift and lift_param_groups find the right layers."""
from __future__ import annotations

import copy
import gc
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("bitsandbytes")

import lift_kernels as lk  # noqa: E402
from lift_kernels.quantized import LIFTQuantLinear, quant_owner, quantize_for_lift  # noqa: E402
from lift_kernels.quantized import registry  # noqa: E402
from quant_fixtures import KINDS, TinyQuantLM, to_bnb  # noqa: E402

IN, OUT = 70, 33


def _layer(kind: str, n_positions: int = 97, seed: int = 0) -> LIFTQuantLinear:
    torch.manual_seed(seed)
    m = LIFTQuantLinear(to_bnb(nn.Linear(IN, OUT), kind))
    if n_positions:
        m.grow(torch.randperm(IN * OUT)[:n_positions].sort().values.to(torch.int32))
        with torch.no_grad():
            m.delta.normal_(0, 0.1)
    return m


def _base_bytes(m: LIFTQuantLinear) -> list[torch.Tensor]:
    """Every tensor the base holds: its weight, bias and quantization statistics."""
    w = m.base.weight
    held = [w.data, m.base.bias]
    qs = getattr(w, "quant_state", None)
    if qs is not None:
        held += [qs.absmax, qs.code] + ([qs.state2.absmax] if qs.nested else [])
    else:
        held.append(w.SCB if w.SCB is not None else m.base.state.SCB)
    return [t.detach().clone() for t in held if t is not None]


@pytest.mark.parametrize("kind", KINDS)
def test_dequantized_is_what_bnb_computes_with(kind):
    m = _layer(kind, n_positions=0)
    x = torch.randn(5, IN)
    torch.testing.assert_close(m(x), m.base(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m(x), F.linear(x, m.dequantized(), m.base.bias), rtol=0, atol=0)
    W = m.dequantized()
    assert W.shape == m.matrix_shape == (OUT, IN) and W.dtype == torch.float32
    assert m.dequantized(torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("kind", KINDS)
def test_effective_weight_adds_the_delta_at_its_positions(kind):
    m = _layer(kind)
    want = m.dequantized().flatten()
    want[m.positions.long()] += m.delta.detach()
    assert torch.equal(m.effective_weight(), want.view(OUT, IN))
    assert torch.equal(m.effective_weight(torch.bfloat16), want.view(OUT, IN).bfloat16())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("selected", ["all", "some", "none"])
def test_backward_is_the_dense_autograd_at_the_selected_slots(kind, selected):
    m = _layer(kind)
    U = m.delta_size
    slots = {"all": None, "some": torch.randperm(U)[:40].sort().values.to(torch.int32),
             "none": torch.zeros(0, dtype=torch.int32)}[selected]
    m.selected = slots
    x = torch.randn(2, 3, IN, requires_grad=True)
    y = m(x)
    W = m.effective_weight().detach().requires_grad_(True)
    want = F.linear(x, W, m.base.bias)
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    grad_x, grad_delta = x.grad.clone(), m.delta.grad.clone()
    x.grad = None
    want.backward(g)
    torch.testing.assert_close(grad_x, x.grad, rtol=1e-6, atol=1e-6)
    dense = W.grad.flatten()[m.positions.long()]
    chosen = torch.arange(U) if slots is None else slots.long()
    expect = torch.zeros(U)
    expect[chosen] = dense[chosen]
    assert grad_delta.dtype == torch.float32 and grad_delta.shape == (U,)
    torch.testing.assert_close(grad_delta, expect, rtol=1e-5, atol=1e-5)
    assert not m.base.weight.requires_grad and m.base.weight.grad is None and m.base.bias.grad is None


def test_bf16_input_computes_in_bf16_and_the_delta_gradient_is_fp32():
    m = _layer("nf4")
    x = torch.randn(4, IN, dtype=torch.bfloat16, requires_grad=True)
    y = m(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, F.linear(x, m.effective_weight(torch.bfloat16)) + m.base.bias.bfloat16())
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and m.delta.grad.dtype == torch.float32


def test_grow_unites_positions_and_carries_values():
    m = _layer("nf4", n_positions=0)
    delta, positions = m.delta, m.positions
    slots, old_to_new = m.grow(torch.tensor([5, 9, 200], dtype=torch.int32))
    assert slots.tolist() == [0, 1, 2] and old_to_new.numel() == 0
    with torch.no_grad():
        m.delta.copy_(torch.tensor([1.0, 2.0, 3.0]))
    m.delta.grad = torch.tensor([10.0, 20.0, 30.0])
    m.selected = torch.tensor([1], dtype=torch.int32)
    slots, old_to_new = m.grow(torch.tensor([0, 9, 100, 2309], dtype=torch.int32))
    assert m.delta is delta and m.positions is positions and isinstance(m.delta, nn.Parameter)
    assert m.positions.dtype == torch.int32 and m.positions.tolist() == [0, 5, 9, 100, 200, 2309]
    assert slots.dtype == torch.int32 and slots.tolist() == [0, 2, 3, 5]
    assert old_to_new.dtype == torch.int64 and old_to_new.tolist() == [1, 2, 4]
    assert m.delta.tolist() == [0.0, 1.0, 2.0, 0.0, 3.0, 0.0] and m.delta.dtype == torch.float32
    assert m.delta.grad.tolist() == [0.0, 10.0, 20.0, 0.0, 30.0, 0.0]
    assert m.selected is None and m.delta_size == 6
    assert quant_owner(m.delta) is m


@pytest.mark.parametrize("positions, match", [
    (torch.tensor([3, 1], dtype=torch.int32), "new_positions must be sorted and without duplicates"),
    (torch.tensor([1, 1], dtype=torch.int32), "new_positions must be sorted and without duplicates"),
    (torch.tensor([0, IN * OUT], dtype=torch.int32), r"new_positions must lie in .* = \[0, 2310\)"),
    (torch.tensor([-1, 4], dtype=torch.int32), r"new_positions must lie in .* got values in \[-1, 4\]"),
    (torch.tensor([1, 2]), r"new_positions must be a 1-D int32 tensor, got torch.int64 .*positions.to\(torch.int32\)"),
    (torch.tensor([[1, 2]], dtype=torch.int32), "new_positions must be a 1-D int32 tensor"),
])
def test_grow_refuses_bad_positions_and_changes_nothing(positions, match):
    m = _layer("fp4", n_positions=5)
    before = m.positions.clone(), m.delta.detach().clone()
    with pytest.raises(ValueError, match=match):
        m.grow(positions)
    assert torch.equal(m.positions, before[0]) and torch.equal(m.delta.detach(), before[1])
    with pytest.raises(TypeError, match="new_positions must be a torch.Tensor"):
        m.grow([1, 2])


def test_a_base_that_is_not_a_quantized_bnb_linear_is_refused():
    import bitsandbytes as bnb

    with pytest.raises(TypeError, match=r"base must be a bitsandbytes.nn.Linear4bit .* got torch.nn.modules.linear"
                                        r".Linear; .*train its weight with LIFTAdamW directly"):
        LIFTQuantLinear(nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"base \(a Linear4bit\) is not quantized yet; .*base.to\('cpu'\)"):
        LIFTQuantLinear(bnb.nn.Linear4bit(8, 3))
    with pytest.raises(ValueError, match=r"base \(a Linear8bitLt\) holds torch.float32 weights.*has_fp16_weights=False"):
        LIFTQuantLinear(bnb.nn.Linear8bitLt(8, 3, has_fp16_weights=True).to("cpu"))


def test_forward_refuses_a_wrong_input():
    m = _layer("int8", n_positions=3)
    with pytest.raises(TypeError, match="x must be a floating tensor, got torch.int64"):
        m(torch.ones(2, IN, dtype=torch.int64))
    with pytest.raises(ValueError, match="x's last dimension must be in_features=70"):
        m(torch.ones(2, IN + 1))


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip_resizes_the_delta(kind):
    model = TinyQuantLM(kind)
    quantize_for_lift(model)
    for i, layer in enumerate([model.q_proj, model.mlp.up_proj, model.mlp.down_proj]):
        layer.grow(torch.randperm(layer.in_features * layer.out_features)[:11 + i].sort().values.to(torch.int32))
        with torch.no_grad():
            layer.delta.normal_(0, 0.1)
    x = torch.randn(4, 37)
    sd = model.state_dict()
    assert sd["q_proj.delta"].shape == sd["q_proj.positions"].shape == (11,) and "q_proj.selected" not in sd
    fresh = TinyQuantLM(kind)  # the same pretrained base
    quantize_for_lift(fresh)
    fresh.q_proj.grow(torch.tensor([1, 2, 3], dtype=torch.int32))  # another U, resized on load
    fresh.q_proj.selected = torch.tensor([0], dtype=torch.int32)
    delta = fresh.q_proj.delta
    # bitsandbytes does not load a Linear4bit's quantization statistics through load_state_dict: the
    # LIFT part (deltas and positions) is what a resume loads over the pretrained base.
    lift_part = {k: v for k, v in sd.items() if k.endswith((".delta", ".positions"))}
    missing, unexpected = fresh.load_state_dict(lift_part, strict=False)
    assert not unexpected and missing and not [k for k in missing if k.endswith((".delta", ".positions"))]
    assert fresh.q_proj.delta is delta and fresh.q_proj.selected is None and quant_owner(delta) is fresh.q_proj
    assert torch.equal(fresh(x), model(x))
    for name in ("q_proj", "mlp.up_proj", "mlp.down_proj"):
        assert torch.equal(fresh.get_submodule(name).positions, model.get_submodule(name).positions)


def test_int8_state_dict_round_trip_restores_the_base_too():
    model = TinyQuantLM("int8", seed=0)
    quantize_for_lift(model)
    model.q_proj.grow(torch.tensor([4, 8, 15], dtype=torch.int32))
    other = TinyQuantLM("int8", seed=1)
    quantize_for_lift(other)
    other.load_state_dict(model.state_dict())
    x = torch.randn(3, 37)
    assert torch.equal(other(x), model(x))


def test_a_bad_checkpoint_is_reported():
    m = _layer("nf4", n_positions=3)
    sd = m.state_dict()
    with pytest.raises(RuntimeError, match="delta and positions must be 1-D of one length"):
        m.load_state_dict({**sd, "positions": torch.tensor([1, 2], dtype=torch.int32)})
    with pytest.raises(RuntimeError, match="positions: .*must be sorted and without duplicates"):
        m.load_state_dict({**sd, "positions": torch.tensor([9, 2, 5], dtype=torch.int32)})


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_quant_owner(how):
    model = TinyQuantLM("nf4")
    quantize_for_lift(model)
    model.q_proj.grow(torch.tensor([0, 7], dtype=torch.int32))
    if how == "deepcopy":
        copied = copy.deepcopy(model)
    else:
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        copied = torch.load(buf, weights_only=False)
    for name in ("q_proj", "mlp.up_proj", "mlp.down_proj"):
        orig, new = model.get_submodule(name), copied.get_submodule(name)
        assert new.delta is not orig.delta
        assert quant_owner(new.delta) is new and quant_owner(orig.delta) is orig
    x = torch.randn(2, 37)
    assert torch.equal(copied(x), model(x))


def test_quant_owner_of_other_tensors_and_of_dead_modules():
    m = _layer("nf4", n_positions=2)
    assert quant_owner(m.base.weight) is None and quant_owner(torch.zeros(2)) is None
    key = id(m.delta)
    del m
    gc.collect()
    assert key not in registry._OWNERS


@pytest.mark.parametrize("kind", KINDS)
def test_training_the_delta_never_touches_the_base(kind):
    m = _layer(kind, n_positions=50)
    before = _base_bytes(m)
    delta0 = m.delta.detach().clone()
    opt = torch.optim.SGD([m.delta], lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(m(torch.randn(8, IN)), torch.randn(8, OUT)).backward()
        opt.step()
    assert not torch.equal(m.delta.detach(), delta0)
    after = _base_bytes(m)
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(before, after))


def test_quantize_for_lift_wraps_the_targets_never_lm_head():
    model = TinyQuantLM("nf4")
    assert quantize_for_lift(model, ["down_proj"]) == ["mlp.down_proj"]
    assert isinstance(model.mlp.down_proj, LIFTQuantLinear) and not isinstance(model.q_proj, LIFTQuantLinear)
    assert quantize_for_lift(model) == ["q_proj", "mlp.up_proj"]
    assert not isinstance(model.lm_head, LIFTQuantLinear)
    assert quantize_for_lift(model) == [] and quantize_for_lift(model, "mlp") == []
    with pytest.raises(ValueError, match=r"target_modules \['k_proj'\] matched no bitsandbytes linear"):
        quantize_for_lift(model, ["k_proj", "q_proj"])
    with pytest.raises(ValueError, match=r"target_modules \['lm_head'\] matched no bitsandbytes linear"):
        quantize_for_lift(TinyQuantLM("int8"), "lm_head")


def test_quantize_for_lift_refuses_a_model_without_bnb_layers():
    from helpers import TinyMLP

    with pytest.raises(ValueError, match="has no bitsandbytes Linear4bit or Linear8bitLt layer.*lift_param_groups"):
        quantize_for_lift(TinyMLP())


def test_lift_param_groups_lists_the_deltas():
    model = TinyQuantLM("fp4")
    quantize_for_lift(model)
    groups = lk.lift_param_groups(model)
    assert groups[0]["param_names"] == ["q_proj.delta", "mlp.up_proj.delta", "mlp.down_proj.delta"]
    assert all(p is model.get_submodule(n.rsplit(".", 1)[0]).delta
               for p, n in zip(groups[0]["params"], groups[0]["param_names"]))
    assert len(groups) == 1  # the frozen bases and their biases are in no group
    only = lk.lift_param_groups(model, ["down_proj"])
    assert only[0]["param_names"] == ["mlp.down_proj.delta"]


def test_liftadamw_groups_built_from_lift_param_groups_hold_the_deltas():
    model = TinyQuantLM("nf4")
    quantize_for_lift(model)
    opt = lk.LIFTAdamW(lk.lift_param_groups(model), rank=2, lra_rank=3, weight_decay=0.0)
    params = opt.param_groups[0]["params"]
    assert [id(p) for p in params] == [id(model.q_proj.delta), id(model.mlp.up_proj.delta),
                                       id(model.mlp.down_proj.delta)]
