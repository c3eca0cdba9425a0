"""LIFT's selection as a PEFT SHiRA mask function (lift_kernels/integrations/peft_mask.py), on a tiny
LlamaForCausalLM on CPU: fp32 and bf16 bases, and bitsandbytes 4-bit bases (peft >= 0.20)."""
import copy

import pytest
import torch

import lift_kernels as lk

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from packaging.version import Version  # noqa: E402  (a dependency of transformers and peft)

from lift_kernels.integrations.peft_mask import QUANTIZED_SHIRA_PEFT, lift_mask_fn  # noqa: E402
from test_hf_integration import tiny_llama  # noqa: E402

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
PEFT_QUANTIZED_SHIRA = Version(peft.__version__) >= Version(QUANTIZED_SHIRA_PEFT)


def shira_model(model, r=2, **mask_options):
    config = peft.ShiraConfig(r=r, target_modules=TARGETS)
    config.mask_fn = lift_mask_fn(**mask_options)
    return peft.get_peft_model(model, config)


def shira_layers(peft_model):
    """{module name: SHiRA layer} of the adapted linears."""
    return {name: m for name, m in peft_model.base_model.model.named_modules()
            if isinstance(m, peft.tuners.shira.layer.Linear)}


def mask_indices(layer) -> torch.Tensor:
    """The SHiRA layer's trained entries as sorted flat indices into its (out, in) weight."""
    rows, cols = layer.shira_indices["default"].long()
    return (rows * layer.in_features + cols).sort().values


def expected(W, r, lra_rank, svd, seed=0):
    m, n = W.shape
    return lk.principal_weights(W, r * (m + n), lra_rank, svd, True, torch.Generator().manual_seed(seed)).long()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("svd, seed", [("fast", 0), ("fast", 7), ("exact", 0)])
def test_mask_is_principal_weights_of_each_base_weight(dtype, svd, seed):
    base = tiny_llama().to(dtype)
    model = shira_model(copy.deepcopy(base), r=2, lra_rank=4, svd=svd, seed=seed)
    layers = shira_layers(model)
    assert len(layers) == 2 * len(TARGETS)
    weights = dict(base.named_modules())
    for name, layer in layers.items():
        W = weights[name].weight.detach()
        m, n = W.shape
        got = mask_indices(layer)
        assert got.numel() == 2 * (m + n)
        assert torch.equal(got, expected(W, 2, 4, svd, seed)), name
        # not merely any r*(m+n) entries: the largest |W'|, which plain magnitude does not give here
        assert not torch.equal(got, W.float().abs().view(-1).topk(got.numel()).indices.sort().values), name


def test_mask_follows_the_weight_dtype_and_device_and_counts_r_times_m_plus_n():
    layer = torch.nn.Linear(48, 32).to(torch.bfloat16)
    mask = lift_mask_fn(lra_rank=4, svd="exact")(layer, 3, bias=True)  # peft passes keyword arguments
    assert mask.shape == (32, 48) and mask.dtype == torch.bfloat16 and mask.device == layer.weight.device
    assert set(mask.unique().tolist()) == {0.0, 1.0} and int(mask.sum()) == 3 * (32 + 48)
    assert torch.equal(mask.view(-1).nonzero().view(-1), expected(layer.weight.detach(), 3, 4, "exact"))
    # the budget is capped at m*n, like LIFTAdamW's rank (peft refuses such an r itself)
    assert int(lift_mask_fn(lra_rank=4)(torch.nn.Linear(8, 8), 5).sum()) == 64


def test_shira_training_changes_only_the_lift_selected_entries():
    base = tiny_llama()
    model = shira_model(copy.deepcopy(base), r=2, lra_rank=4)
    masks = {name: mask_indices(layer) for name, layer in shira_layers(model).items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    merged = dict(model.merge_and_unload().named_modules())
    for name, module in base.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        changed = (merged[name].weight != module.weight).view(-1).nonzero().view(-1)
        if name in masks:
            assert changed.numel() > 0 and torch.isin(changed, masks[name]).all(), name
        else:
            assert changed.numel() == 0, name


def quantize_targets(model):
    """The model with its target linears replaced by bitsandbytes NF4 Linear4bit (quantized on CPU)."""
    bnb = pytest.importorskip("bitsandbytes")
    for name, module in list(model.named_modules()):
        if name.split(".")[-1] not in TARGETS:
            continue
        q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                              compute_dtype=torch.float32, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(module.weight.data.clone(), requires_grad=False, quant_type="nf4")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q.to("cpu"))  # .to() quantizes
    return model


@pytest.mark.skipif(not PEFT_QUANTIZED_SHIRA, reason="peft < 0.20 puts no SHiRA on quantized layers")
def test_mask_on_a_4bit_base_is_principal_weights_of_the_dequantized_weight():
    bnb = pytest.importorskip("bitsandbytes")
    model = quantize_targets(tiny_llama())
    quantized = {name: bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
                 for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(quantized) == 2 * len(TARGETS)
    model = shira_model(model, r=2, lra_rank=4)
    layers = shira_layers(model)
    assert set(layers) == set(quantized)
    for name, layer in layers.items():
        assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
        assert torch.equal(mask_indices(layer), expected(quantized[name], 2, 4, "fast")), name
    # and it trains: the SHiRA weights move, the 4-bit base does not
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != ("shira_weight" in n), n


@pytest.mark.skipif(PEFT_QUANTIZED_SHIRA, reason="peft >= 0.20 puts SHiRA on quantized layers")
def test_on_old_peft_a_4bit_base_is_refused_naming_the_peft_needed():
    model = quantize_targets(tiny_llama())
    with pytest.raises(TypeError, match=r"SHiRA on a quantized Linear4bit needs peft >= 0\.20 \(installed: 0\.1"):
        shira_model(model, r=2, lra_rank=4)


def test_lra_rank_reaching_min_m_n_masks_the_largest_magnitudes():
    """lift_mask_fn's default lra_rank=64 on a 32x48 layer: its best rank-64 approximation is the
    weight itself, so the mask is the top r*(m+n) of |W|, as LIFTAdamW selects it."""
    layer = torch.nn.Linear(48, 32)
    mask = lift_mask_fn()(layer, 2)
    want = layer.weight.detach().abs().view(-1).topk(2 * (32 + 48)).indices.sort().values
    assert torch.equal(mask.view(-1).nonzero().view(-1), want)


def test_bad_options_are_refused_with_the_parameter_named():
    with pytest.raises(ValueError, match="lra_rank must be an integer"):
        lift_mask_fn(lra_rank=0)
    with pytest.raises(ValueError, match="svd must be one of"):
        lift_mask_fn(svd="approximate")
    with pytest.raises(ValueError, match="seed must be an integer"):
        lift_mask_fn(seed=None)
    with pytest.raises(ValueError, match="ShiraConfig r must be an integer >= 1"):
        lift_mask_fn(lra_rank=4)(torch.nn.Linear(48, 32), 0)


def test_import_lift_kernels_integrations_peft_mask_does_not_import_peft():
    import subprocess
    import sys

    code = ("import sys, lift_kernels.integrations.peft_mask; "
            "print(sorted(m for m in ('peft', 'transformers', 'bitsandbytes') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
