"""LIFT's result as a PEFT SHiRA adapter (issue 19, item 2): loads, forwards and merges like LIFT's model."""
import json

import pytest
import torch

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import lift_kernels as lk  # noqa: E402
from lift_kernels.integrations.peft_export import AdapterError, save_shira_adapter  # noqa: E402


def tiny_llama(dtype=torch.float32, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=50, max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(config).to(dtype)


def train_lift(model, steps=3, master_weights=False):
    """A few LIFTAdamW steps; returns the base state dict taken before them."""
    base = {k: v.clone() for k, v in model.state_dict().items()}
    groups = lk.lift_param_groups(model)
    opt = lk.LIFTAdamW(groups, lr=1e-2, rank=2, lra_rank=2, update_interval=2, seed=0,
                       **({"master_weights": True} if master_weights else {}))
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return base


def load_adapter(folder, dtype=torch.float32, seed=0):
    from peft import PeftModel

    return PeftModel.from_pretrained(tiny_llama(dtype, seed), str(folder))


def test_merge_is_bit_equal_and_forward_equal(tmp_path):
    model = tiny_llama()
    base = train_lift(model)
    stats = save_shira_adapter(model, base, tmp_path / "ad")
    files = sorted(p.name for p in (tmp_path / "ad").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    assert stats.layers == 14 and stats.changed_entries > 0 and stats.padding_entries >= 0
    assert stats.stored_entries == stats.r * 2 * (64 + 48 + 48 + 64 + 96 + 96 + 96)  # r*(m+n) per layer
    assert stats.padding_entries == stats.stored_entries - stats.changed_entries
    peft_model = load_adapter(tmp_path / "ad")
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, peft_model(input_ids=ids).logits
    if stats.inexact_entries == 0:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want)
    merged = peft_model.merge_and_unload().state_dict()
    tuned = model.state_dict()
    wrong = sum(int((merged[k] != tuned[k]).sum()) for k in tuned)
    assert wrong == stats.inexact_entries
    # the adapter is not the base: the merge changed what LIFT changed
    assert sum(int((base[k] != tuned[k]).sum()) for k in tuned) == stats.changed_entries


def test_keys_and_dtypes_are_peft_own(tmp_path):
    """Our file has the keys, shapes and dtypes peft writes for a SHiRA adapter on the same layers."""
    from peft import ShiraConfig, get_peft_model
    from safetensors import safe_open

    model = tiny_llama()
    base = train_lift(model)
    stats = save_shira_adapter(model, base, tmp_path / "ours")
    targets = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["target_modules"]
    get_peft_model(tiny_llama(), ShiraConfig(r=stats.r, target_modules=targets)).save_pretrained(tmp_path / "peft")
    with safe_open(str(tmp_path / "ours" / "adapter_model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            x, y = a.get_tensor(key), b.get_tensor(key)
            assert (x.dtype, x.shape) == (y.dtype, y.shape), key


def test_inexact_entries_are_counted_and_bounded(tmp_path):
    """Weights that cross zero to a tiny value cannot all be held by an fp32 difference: counted, <= 1 ulp."""
    model = tiny_llama()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    w = model.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        w.view(-1)[:20] = torch.linspace(1e-12, 3e-12, 20) * torch.sign(-w.view(-1)[:20])  # crossed zero
        w.view(-1)[20:40] += 1e-3                                                         # ordinary steps
    stats = save_shira_adapter(model, base, tmp_path / "ad")
    assert stats.layers == 1 and stats.changed_entries == 40
    assert 0 < stats.inexact_entries <= 20 and 0 < stats.max_error_ulps <= 1
    merged = load_adapter(tmp_path / "ad").merge_and_unload().model.layers[0].mlp.down_proj.weight
    off = (merged != w).view(-1)
    assert int(off.sum()) == stats.inexact_entries and not off[20:].any()
    assert float((merged - w).detach().abs().max()) == pytest.approx(stats.max_abs_error, rel=0, abs=0)


def test_bf16_base_with_master_weights(tmp_path):
    model = tiny_llama(torch.bfloat16)
    base = train_lift(model, master_weights=True)
    stats = save_shira_adapter(model, base, tmp_path / "ad")
    merged = load_adapter(tmp_path / "ad", torch.bfloat16).merge_and_unload().state_dict()
    tuned = model.state_dict()
    assert sum(int((merged[k] != tuned[k]).sum()) for k in tuned) == stats.inexact_entries == 0


def test_refuses_what_shira_cannot_hold(tmp_path):
    model = tiny_llama()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.model.embed_tokens.weight[0, 0] += 1
    with pytest.raises(AdapterError, match="nn.Linear weights only"):
        save_shira_adapter(model, base, tmp_path / "a")
    model = tiny_llama()
    with pytest.raises(AdapterError, match="nothing"):
        save_shira_adapter(model, base, tmp_path / "b")
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight += 1  # every entry of a 16 x 32 matrix
    with pytest.raises(AdapterError, match="use the delta"):
        save_shira_adapter(model, base, tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_padding_keeps_signed_zeros_bit_for_bit(tmp_path):
    """Padding lands on unchanged entries; there -0.0 keeps +0.0 and -0.0 as they are (+0.0 padding would not)."""
    from peft import PeftModel

    model = tiny_llama()
    with torch.no_grad():
        k = model.model.layers[0].self_attn.k_proj.weight.view(-1)  # 16 x 32: r * 48 entries stored
        k[:200:2] = 0.0
        k[1:200:2] = -0.0
    base = {name: v.clone() for name, v in model.state_dict().items()}
    with torch.no_grad():
        k[300] += 1e-3                                                     # k_proj: 1 change, the rest padding
        model.model.layers[1].mlp.down_proj.weight.view(-1)[:300] += 1e-3  # 32 x 64: r = ceil(300 / 96) = 4
    stats = save_shira_adapter(model, base, tmp_path / "ad")
    assert stats.r == 4 and stats.padding_entries == 4 * 48 - 1 + 4 * 96 - 300
    fresh = tiny_llama()
    fresh.load_state_dict(base)
    merged = PeftModel.from_pretrained(fresh, str(tmp_path / "ad")).merge_and_unload().state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(merged[name].view(torch.int32), t.view(torch.int32)), name
