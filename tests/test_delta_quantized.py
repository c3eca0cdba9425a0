"""save_delta of a model holding LIFTQuantLinear layers (issue 20, item 1): the delta of M.weight is its
effective weight against its dequantized base, and applies exactly to the dequantized float model."""
import copy

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes")
import bitsandbytes as bnb  # noqa: E402

import lift_kernels as lk  # noqa: E402
from lift_finetune import quantize  # noqa: E402
from lift_kernels.quantized import quantize_for_lift  # noqa: E402


def quantized_model(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64, bias=False), nn.Linear(64, 16))
    out = nn.Sequential()
    for i, layer in enumerate(model):
        if not isinstance(layer, nn.Linear):
            out.append(layer)
            continue
        if kind == "4bit":
            q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                  compute_dtype=torch.float32, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(layer.weight.data.clone(), requires_grad=False, quant_type="nf4")
        else:
            q = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                    has_fp16_weights=False)
            q.weight = bnb.nn.Int8Params(layer.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        if layer.bias is not None:
            q.bias = nn.Parameter(layer.bias.data.clone(), requires_grad=False)
        out.append(q.to("cpu"))
    return out


def train_by_hand(model, names):
    """What LIFTAdamW leaves behind: grown positions with values, one of them too small to change fp32."""
    gen = torch.Generator().manual_seed(1)
    for name in names:
        layer = model.get_submodule(name)
        n = layer.in_features * layer.out_features
        pos = torch.randperm(n, generator=gen)[:40].sort().values.to(torch.int32)
        layer.grow(pos)
        with torch.no_grad():
            layer.delta.copy_(torch.randn(layer.delta_size, generator=gen) * 1e-2)
            layer.delta[0] = 1e-30  # lost in the fp32 sum: the trained weight does not change there
            layer.delta[1] = 0.0


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_delta_of_quantized_layers_applies_exactly_to_the_dequantized_base(kind, tmp_path):
    model = quantized_model(kind)
    names = quantize_for_lift(model, ["0", "2"])  # layer 3 stays a plain bnb layer: untrained
    train_by_hand(model, names)
    base = quantize.to_float(copy.deepcopy(model), with_delta=False)
    tuned = quantize.to_float(copy.deepcopy(model))
    stats = lk.save_delta(model, {}, tmp_path / "d.safetensors")
    sizes = [model.get_submodule(n).delta_size for n in names]
    assert stats.tensors == 2 and stats.entries <= sum(sizes) - 2 * len(names)
    assert stats.model_bytes == sum(t.numel() * t.element_size() for t in tuned.state_dict().values())
    lk.apply_delta(base, tmp_path / "d.safetensors")
    assert all(torch.equal(v, tuned.state_dict()[k]) for k, v in base.state_dict().items())
    for name in names:  # the float model computes with exactly the layers' effective weights
        assert torch.equal(base.get_submodule(name).weight, model.get_submodule(name).effective_weight())
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(base(x), model(x), rtol=1e-5, atol=1e-5 if kind == "4bit" else 5e-2)
    lk.remove_delta(base, tmp_path / "d.safetensors")
    assert all(torch.equal(v, quantize.to_float(copy.deepcopy(model), with_delta=False).state_dict()[k])
               for k, v in base.state_dict().items())


def test_the_recipe_base_copy_of_a_quantized_model_works_too(tmp_path):
    """README's recipe, base = a copy of model.state_dict() before training: the layers' own state (packed
    base, delta, positions) is not compared, each layer's base is its frozen bnb weight."""
    model = quantized_model("4bit")
    names = quantize_for_lift(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_by_hand(model, names)
    a = lk.save_delta(model, before, tmp_path / "a.safetensors")
    b = lk.save_delta(model, {}, tmp_path / "b.safetensors")
    assert (a.tensors, a.entries) == (b.tensors, b.entries) and a.entries > 0


def test_apply_delta_onto_the_quantized_model_says_what_to_do(tmp_path):
    model = quantized_model("4bit")
    names = quantize_for_lift(model)
    train_by_hand(model, names)
    lk.save_delta(model, {}, tmp_path / "d.safetensors")
    with pytest.raises(lk.DeltaError, match="is a LIFTQuantLinear .* dequantized base"):
        lk.apply_delta(model, tmp_path / "d.safetensors")
