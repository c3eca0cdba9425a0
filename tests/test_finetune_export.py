"""lift-finetune's model folder and PEFT adapter, and `lift-finetune export` (issue 19, items 1 and 2)."""
import json
import os

import pytest
import torch
from finetune_fixtures import build_tiny_model

pytest.importorskip("peft")
from lift_finetune import cli  # noqa: E402

SMALL = ["--rank", "2", "--lra-rank", "2", "--batch-size", "4", "--max-eval", "6", "--max-new-tokens", "4",
         "--eval-batch-size", "8", "--device", "cpu", "--max-steps", "3"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    cli.main(["--model", tiny_model, "--output-dir", str(out), *SMALL])
    return out


def tuned_state(tiny_model, out):
    """The fine-tuned weights: the base with the final checkpoint's trainable weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    trained = torch.load(out / "checkpoint-000003.pt", weights_only=True)["trainable"]
    with torch.no_grad():
        for name, w in trained.items():
            model.get_parameter(name).copy_(w)
    return model


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    assert all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)


def test_model_folder_loads_offline_bit_equal(tiny_model, run, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    names = set(os.listdir(run / "model"))
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= names, names
    loaded = AutoModelForCausalLM.from_pretrained(run / "model")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert_same_weights(loaded, tuned_state(tiny_model, run))
    assert AutoTokenizer.from_pretrained(run / "model")("What is 2 + 3?")["input_ids"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model_folder"]["dtype"] == "float32" and summary["model_folder"]["bytes"] > 0


def test_peft_adapter_merges_to_the_run_weights(tiny_model, run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    summary = json.loads((run / "summary.json").read_text())["peft_adapter"]
    assert summary["path"] == "peft-adapter" and summary["changed_entries"] > 0
    tuned = tuned_state(tiny_model, run)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                                           str(run / "peft-adapter"))
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = peft_model(input_ids=ids).logits, tuned(input_ids=ids).logits
    merged = peft_model.merge_and_unload()
    wrong = sum(int((merged.state_dict()[k] != v).sum()) for k, v in tuned.state_dict().items())
    assert wrong == summary["inexact_entries"]
    if wrong == 0:
        assert torch.equal(got, want)
        assert_same_weights(merged, tuned)


def test_flags_turn_them_off(tiny_model, tmp_path):
    out = tmp_path / "off"
    cli.main(["--model", tiny_model, "--output-dir", str(out), *SMALL, "--max-steps", "1", "--no-save-model",
              "--no-peft-adapter"])
    assert not (out / "model").exists() and not (out / "peft-adapter").exists() and (out / "delta.safetensors").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model_folder"] is None and summary["peft_adapter"] is None


def test_full_fine_tuning_says_why_no_adapter(tiny_model, tmp_path):
    out = tmp_path / "full"
    cli.main(["--model", tiny_model, "--output-dir", str(out), *SMALL, "--max-steps", "1", "--method", "full"])
    assert (out / "model").is_dir() and not (out / "peft-adapter").exists()
    assert "changes every entry" in json.loads((out / "summary.json").read_text())["peft_adapter"]["skipped"]


def test_export_builds_the_same_folders_from_the_delta(tiny_model, run, tmp_path, capsys):
    from safetensors.torch import load_file

    # --model defaults to the run's own (summary.json beside the delta)
    assert cli.main(["export", "--delta", str(run / "delta.safetensors"), "--output-dir", str(tmp_path / "x")]) == 0
    assert "model folder:" in capsys.readouterr().out
    for folder, file in (("model", "model.safetensors"), ("peft-adapter", "adapter_model.safetensors")):
        a, b = load_file(run / folder / file), load_file(tmp_path / "x" / folder / file)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), folder
    assert json.loads((run / "peft-adapter" / "adapter_config.json").read_text()) == \
        json.loads((tmp_path / "x" / "peft-adapter" / "adapter_config.json").read_text())
    with pytest.raises(SystemExit, match="exists"):
        cli.main(["export", "--delta", str(run / "delta.safetensors"), "--output-dir", str(tmp_path / "x")])


def test_export_refuses_another_base(run, tmp_path):
    other = build_tiny_model(str(tmp_path / "other"))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(other)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    model.save_pretrained(other)
    with pytest.raises(SystemExit, match="pass --model"):
        cli.main(["export", "--delta", str(run / "delta.safetensors"), "--output-dir", str(tmp_path / "y"),
                  "--model", other])
    assert not (tmp_path / "y" / "model").exists()


def test_export_on_the_builtin_gguf_base(tmp_path, monkeypatch):
    """A GGUF base (the built-in SmolLM2, dequantized to fp32): model folder bit-equal, adapter merges back."""
    import smollm2
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import lift_kernels as lk
    from lift_finetune import model as model_io

    smollm2.require()
    model, _ = model_io.load(model_io.builtin_source(), torch.device("cpu"))
    base = {k: v.clone() for k, v in model.state_dict().items() if "down_proj" in k}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers[:3]):
            w = layer.mlp.down_proj.weight.view(-1)
            w[i:5000:37] += 1e-3                      # ordinary steps

    lk.save_delta(model, base, tmp_path / "delta.safetensors")  # no summary.json beside it: the built-in base
    assert cli.main(["export", "--delta", str(tmp_path / "delta.safetensors"), "--output-dir", str(tmp_path / "x")]) == 0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "x" / "model")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert_same_weights(loaded, model)
    config = json.loads((tmp_path / "x" / "peft-adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"].endswith(".gguf") and len(config["target_modules"]) == 3
    tuned = {k: v.clone() for k, v in model.state_dict().items()}
    lk.remove_delta(model, tmp_path / "delta.safetensors")
    merged = PeftModel.from_pretrained(model, str(tmp_path / "x" / "peft-adapter")).merge_and_unload().state_dict()
    wrong = sum(int((merged[k] != v).sum()) for k, v in tuned.items())
    assert wrong == 0  # no entry crossed zero: every entry merges exactly
