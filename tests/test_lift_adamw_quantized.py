"""LIFTAdamW over quantized bases: a bitsandbytes 4-bit or 8-bit layer frozen, a sparse delta trained.

The oracle is LIFTAdamW on plain fp32 weights that start equal to the dequantized base: the first
selection scores the same matrix with the same random stream, so it selects the same entries, and
every step applies the same AdamW update (to the delta instead of the weight), so the effective
weights follow the plain run up to fp32 rounding of (base + delta) against a weight updated in place.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import lift_kernels as lk

bnb = pytest.importorskip("bitsandbytes")
quantized = pytest.importorskip("lift_kernels.quantized")

SHAPES = [(33, 70), (48, 33), (20, 48)]  # odd sizes, three layers of a chain


def _quantized_chain(kind: str, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for out_f, in_f in SHAPES:
        lin = nn.Linear(in_f, out_f)
        if kind == "int8":
            q = bnb.nn.Linear8bitLt(in_f, out_f, bias=True, has_fp16_weights=False)
        else:
            q = bnb.nn.Linear4bit(in_f, out_f, bias=True, compute_dtype=torch.float32, quant_type=kind)
        q.load_state_dict(lin.state_dict())
        layers += [q.to("cpu"), nn.Tanh()]
    model = nn.Sequential(*layers)
    quantized.quantize_for_lift(model)
    return model


def _layers(model) -> list:
    return [m for m in model.modules() if isinstance(m, quantized.LIFTQuantLinear)]


def _plain_twin(model) -> nn.Sequential:
    """fp32 nn.Linear layers holding the quantized chain's effective weights and biases."""
    layers = []
    for q in _layers(model):
        lin = nn.Linear(q.in_features, q.out_features)
        with torch.no_grad():
            lin.weight.copy_(q.effective_weight())
            lin.bias.copy_(q.base.bias.float())
        lin.bias.requires_grad_(False)
        layers += [lin, nn.Tanh()]
    return nn.Sequential(*layers)


def _batches(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(7, SHAPES[0][1], generator=g), torch.randn(7, SHAPES[-1][0], generator=g)) for _ in range(n)]


def _train(model, opt, batches, micro: int = 1):
    for x, y in batches:
        for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
            loss = nn.functional.mse_loss(model(xs), ys) / micro
            loss.backward()
        opt.step()
        opt.zero_grad()


OPTIONS = dict(lr=1e-2, rank=2, lra_rank=4, update_interval=3, seed=5)


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_follows_plain_lift_on_the_dequantized_weights(kind):
    model = _quantized_chain(kind)
    twin = _plain_twin(model)
    base = [bytes(q.base.weight.data.view(torch.uint8).numpy()) for q in _layers(model)]
    opt = lk.LIFTAdamW(lk.lift_param_groups(model), **OPTIONS)
    ref = lk.LIFTAdamW(lk.lift_param_groups(twin), **OPTIONS)
    batches = _batches(8)
    for b in batches:  # step by step, so that every selection can be compared
        _train(model, opt, [b])
        _train(twin, ref, [b])
        for q, lin in zip(_layers(model), [m for m in twin if isinstance(m, nn.Linear)]):
            slots = opt.state[q.delta]["idx"].long()
            assert torch.equal(q.positions.long()[slots], ref.state[lin.weight]["idx"].long())
            torch.testing.assert_close(q.effective_weight(), lin.weight, rtol=0, atol=1e-5)
    for q, raw in zip(_layers(model), base):
        assert bytes(q.base.weight.data.view(torch.uint8).numpy()) == raw  # the base never changes
        assert not q.base.weight.requires_grad


def test_delta_grows_to_the_union_and_only_selected_entries_change():
    model = _quantized_chain("nf4")
    opt = lk.LIFTAdamW(lk.lift_param_groups(model), selector="random", **{**OPTIONS, "update_interval": 2})
    layer = _layers(model)[0]
    k = (layer.out_features + layer.in_features) * OPTIONS["rank"]
    seen = set()
    for t, b in enumerate(_batches(6), start=1):
        model(b[0])  # the forward before step t makes step t's selection
        before = layer.delta.detach().clone()
        positions_before = layer.positions.clone()
        selected = set(layer.positions[opt.state[layer.delta]["idx"].long()].tolist())
        seen |= selected
        _train(model, opt, [b])
        assert set(layer.positions.tolist()) == seen  # the union of the selections so far
        assert layer.delta_size == len(seen) <= k * ((t + 1) // 2 + 1)
        changed = set(positions_before[(layer.delta.detach() != before)].tolist())
        assert changed <= selected and changed  # only selected entries move
        assert len(selected) == k
    assert layer.delta_size > k  # random re-selections made it grow


def test_resume_is_bit_exact_and_load_order_is_checked():
    def run(steps, state=None):
        model = _quantized_chain("nf4")
        opt = lk.LIFTAdamW(lk.lift_param_groups(model), moment_bits=8, **{**OPTIONS, "update_interval": 2})
        if state is not None:  # only the deltas: the 4-bit base is the same frozen one
            missing, unexpected = model.load_state_dict(state[0], strict=False)
            assert not unexpected and all(not k.endswith((".delta", ".positions")) for k in missing)
            opt.load_state_dict(state[1])
        _train(model, opt, steps)
        return model, opt

    batches = _batches(7)
    whole, _ = run(batches)
    half, half_opt = run(batches[:4])
    buf = io.BytesIO()
    deltas = {k: v for k, v in half.state_dict().items() if k.endswith((".delta", ".positions"))}
    torch.save((deltas, half_opt.state_dict()), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed, _ = run(batches[4:], saved)
    for a, b in zip(_layers(whole), _layers(resumed)):
        assert torch.equal(a.positions, b.positions)
        assert torch.equal(a.delta, b.delta)

    fresh = _quantized_chain("nf4")
    opt = lk.LIFTAdamW(lk.lift_param_groups(fresh), moment_bits=8, **{**OPTIONS, "update_interval": 2})
    with pytest.raises(ValueError, match="load the model's state"):
        opt.load_state_dict(saved[1])


def test_sparse_grad_and_micro_batches_take_the_same_steps():
    outs = []
    for sparse_grad, micro in [(False, 1), (True, 1), (True, 7)]:
        model = _quantized_chain("nf4")
        opt = lk.LIFTAdamW(lk.lift_param_groups(model), sparse_grad=sparse_grad, **OPTIONS)
        _train(model, opt, _batches(5), micro=micro)
        outs.append([q.delta.detach().clone() for q in _layers(model)])
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_clip_grad_norm_sees_the_selected_gradient():
    model = _quantized_chain("fp4")
    twin = _plain_twin(model)
    opt = lk.LIFTAdamW(lk.lift_param_groups(model), **OPTIONS)
    ref = lk.LIFTAdamW(lk.lift_param_groups(twin), **OPTIONS)
    x, y = _batches(1)[0]
    nn.functional.mse_loss(model(x), y).backward()
    nn.functional.mse_loss(twin(x), y).backward()
    torch.testing.assert_close(opt.clip_grad_norm_(1.0), ref.clip_grad_norm_(1.0), rtol=1e-5, atol=0)


def test_refusals_name_the_option():
    model = _quantized_chain("nf4")

    def groups():  # torch.optim writes the defaults into the group dicts it is given
        return lk.lift_param_groups(model)

    with pytest.raises(ValueError, match="weight_decay"):
        lk.LIFTAdamW(groups(), weight_decay=0.1)
    with pytest.raises(ValueError, match="selector='gradient'"):
        lk.LIFTAdamW(groups(), selector="gradient")
    with pytest.raises(ValueError, match="only LIFT trains"):
        lk.LIFTAdamW([{**groups()[0], "lift": False}])
    with pytest.raises(ValueError, match="master_weights"):
        lk.LIFTAdamW(groups(), master_weights=True)
    opt = lk.LIFTAdamW(groups(), **OPTIONS)
    with pytest.raises(TypeError, match="cannot be copied or pickled"):
        copy.deepcopy(opt)
    x, y = _batches(1)[0]
    nn.functional.mse_loss(model(x), y).backward()
    opt.param_groups[0]["weight_decay"] = 0.01
    delta = [q.delta.detach().clone() for q in _layers(model)]
    with pytest.raises(ValueError, match="weight_decay must stay 0"):
        opt.step()
    assert all(torch.equal(a, q.delta) for a, q in zip(delta, _layers(model)))


def test_a_gradient_from_before_the_optimizer_is_refused():
    model = _quantized_chain("nf4")
    x, y = _batches(1)[0]
    nn.functional.mse_loss(model(x), y).backward()  # no optimizer yet: no selection, an empty delta
    opt = lk.LIFTAdamW(lk.lift_param_groups(model), **OPTIONS)
    with pytest.raises(RuntimeError, match="run forward and backward again"):
        opt.step()
    opt.zero_grad()
    _train(model, opt, _batches(1))
    assert all(q.delta.count_nonzero() > 0 for q in _layers(model))


def test_selection_inside_an_activation_checkpointed_block():
    """The forward pre-hook selects with autograd off: a checkpointed block's recompute (no selection)
    saves what its forward saved, on the selecting steps too."""
    from torch.utils.checkpoint import checkpoint

    model = _quantized_chain("nf4")
    opt = lk.LIFTAdamW(lk.lift_param_groups(model), **{**OPTIONS, "update_interval": 2})
    for x, y in _batches(4):
        out = checkpoint(model, x, use_reentrant=False)
        nn.functional.mse_loss(out, y).backward()
        opt.step()
        opt.zero_grad()
    assert all(q.delta.count_nonzero() > 0 for q in _layers(model))


def test_a_whole_delta_selection_costs_no_index_memory():
    """Until a re-selection adds entries, a layer's selection is its whole delta: its idx (0..U-1) is a
    view of one tensor shared by every layer; after growth it is the layer's own."""
    model = _quantized_chain("nf4")
    opt = lk.LIFTAdamW(lk.lift_param_groups(model), selector="random", **{**OPTIONS, "update_interval": 2})
    _train(model, opt, _batches(1))
    idxs = [opt.state[q.delta]["idx"] for q in _layers(model)]
    assert len({i.untyped_storage().data_ptr() for i in idxs}) == 1
    for i, q in zip(idxs, _layers(model)):
        assert torch.equal(i, torch.arange(q.delta_size, dtype=torch.int32))
    _train(model, opt, _batches(1, seed=2))  # step 2 re-selects at random: the deltas grow
    grown = [opt.state[q.delta]["idx"] for q in _layers(model)]
    assert all(q.delta_size > i.numel() for q, i in zip(_layers(model), grown))
    assert len({i.untyped_storage().data_ptr() for i in grown}) == len(grown)
