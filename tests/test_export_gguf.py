"""`lift-finetune export` on a GGUF base, the built-in SmolLM2-135M (issue 19, items 1 and 2).

A GGUF base is dequantized to fp32 when loaded, so its model folder is fp32 and must hold the
fine-tuned weights bit for bit; its SHiRA adapter must merge to them bit for bit (compared as bits, so
a padding entry that turned +0.0 into -0.0 would count) except the entries that crossed zero to tiny
values, which are bounded by one unit in the last place of the base value.
"""
import json

import pytest
import torch

import smollm2
import lift_kernels as lk
from lift_finetune import cli
from lift_finetune import model as model_io

CROSSED = 50  # entries of one down_proj set to a tiny value of the other sign


def bits(t):
    return t.detach().contiguous().view(torch.int32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    smollm2.require()
    pytest.importorskip("peft")
    gguf = smollm2.gguf_path()
    model, _ = model_io.load(model_io.resolve(gguf), torch.device("cpu"))
    base = {k: v.clone() for k, v in model.state_dict().items() if v.dim() == 2}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a sparse fine-tune: scattered small steps in two layers, a few sign crossings
        q = model.model.layers[0].self_attn.q_proj.weight.view(-1)
        idx = torch.randperm(q.numel(), generator=g)[:500]
        q[idx] += 1e-3 * torch.randn(500, generator=g)
        down = model.model.layers[3].mlp.down_proj.weight.view(-1)
        down[:CROSSED] = -down[:CROSSED] * 1e-4
    folder = tmp_path_factory.mktemp("gguf")
    lk.save_delta(model, base, folder / "delta.safetensors")
    out = folder / "out"
    assert cli.main(["export", "--delta", str(folder / "delta.safetensors"), "--output-dir", str(out),
                     "--model", gguf]) == 0
    return gguf, model.state_dict(), out


def test_model_folder_is_fp32_and_bit_equal(exported, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, tuned, out = exported
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = AutoModelForCausalLM.from_pretrained(out / "model")
    state = loaded.state_dict()
    assert set(state) == set(tuned)
    assert all(t.dtype == torch.float32 for t in state.values())
    assert all(torch.equal(bits(state[k]), bits(tuned[k])) for k in tuned)
    config = json.loads((out / "model" / "config.json").read_text())
    assert config.get("torch_dtype", config.get("dtype")) == "float32"
    assert "quantization_config" not in config
    assert AutoTokenizer.from_pretrained(out / "model")("What is 46 + 30?")["input_ids"]


def test_adapter_merges_bit_equal_but_the_crossings(exported):
    from peft import PeftModel

    gguf, tuned, out = exported
    config = json.loads((out / "peft-adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["model.layers.0.self_attn.q_proj", "model.layers.3.mlp.down_proj"]
    base, _ = model_io.load(model_io.resolve(gguf), torch.device("cpu"))
    old = base.model.layers[3].mlp.down_proj.weight.detach().clone().view(-1)
    merged = PeftModel.from_pretrained(base, str(out / "peft-adapter")).merge_and_unload().state_dict()
    off = {k: torch.nonzero(bits(merged[k]).view(-1) != bits(tuned[k]).view(-1)).flatten() for k in tuned}
    off = {k: v for k, v in off.items() if v.numel()}
    # Only crossed entries may be off, each by at most one ulp of the base value (fp32: eps * |base|).
    assert set(off) <= {"model.layers.3.mlp.down_proj.weight"}
    where = off.get("model.layers.3.mlp.down_proj.weight", torch.empty(0, dtype=torch.long))
    assert where.numel() > 0 and bool((where < CROSSED).all())
    err = (merged["model.layers.3.mlp.down_proj.weight"].view(-1)[where].double()
           - tuned["model.layers.3.mlp.down_proj.weight"].view(-1)[where].double()).abs()
    assert bool((err <= torch.finfo(torch.float32).eps * old[where].double().abs()).all())
