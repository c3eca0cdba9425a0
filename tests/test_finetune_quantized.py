"""lift-finetune over a bitsandbytes-quantized base: --load-in-4bit / --load-in-8bit (issue 20, items 1 and 3).

LIFT trains a sparse fp32 delta over the frozen 4/8-bit weights (lift_kernels.quantized.LIFTQuantLinear);
lora is QLoRA. Every export is relative to the dequantized base: the model folder is a plain float model,
the delta applies exactly to the dequantized base, resume continues exactly.
"""
import json
import os

import pytest
import torch
from finetune_fixtures import build_tiny_model, crash_at_step, run_cli
from safetensors import safe_open

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")
import lift_kernels as lk  # noqa: E402
from lift_finetune import checkpoint, cli, export, methods, quantize  # noqa: E402
from lift_finetune import model as model_io  # noqa: E402

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny")))


def parse_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.parse(list(argv))
    assert exc.value.code == 2
    return capsys.readouterr().err


def summary_of(out):
    return json.loads((out / "summary.json").read_text())


def float_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def assert_layout_of(tiny_model, folder):
    """The saved float model has exactly the base's tensors, names, shapes and dtypes (nothing of bnb)."""
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        saved = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
    with safe_open(os.path.join(tiny_model, "model.safetensors"), "pt") as f:
        base = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
    assert saved == base


def rebuild(tiny_model, out, method, bits="4"):
    """The trained model as the run held it (quantized base + trained state), from its last checkpoint."""
    args = summary_of(out)["args"]
    quant = export.run_quant(args)
    model, _ = model_io.load(model_io.resolve(tiny_model), torch.device("cpu"), quant)
    hp = methods.Hyper(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0, rank=2, lra_rank=2, update_interval=100,
                       seed=0, quant=quant)
    setup = methods.build(method, model, hp)
    saved = checkpoint.load(checkpoint.checkpoint_files(str(out))[-1])["trainable"]
    if method == "lora":
        with torch.no_grad():
            for name, p in checkpoint.trainable_state(setup.model).items():
                p.copy_(saved[name])
    else:
        checkpoint._resize_quant_layers(setup.model, saved)
    return setup.model


# -- flags --------------------------------------------------------------------------------------------

def test_flags_parse_and_combine(capsys):
    a = cli.parse(["--load-in-4bit"])
    assert a.load_in_4bit and not a.load_in_8bit and a.bnb_4bit_quant_type == "nf4"
    a = cli.parse(["--load-in-4bit", "--bnb-4bit-quant-type", "fp4", "--moment-bits", "8", "--method", "magnitude"])
    assert a.bnb_4bit_quant_type == "fp4" and a.moment_bits == 8
    a = cli.parse(["--load-in-8bit", "--method", "lora", "--weight-decay", "0.01"])  # QLoRA's adapters decay
    assert a.load_in_8bit and a.bnb_4bit_quant_type is None
    assert "not allowed with argument" in parse_error(capsys, "--load-in-4bit", "--load-in-8bit")
    assert "--bnb-4bit-quant-type applies to --load-in-4bit only" in parse_error(
        capsys, "--load-in-8bit", "--bnb-4bit-quant-type", "nf4")
    err = parse_error(capsys, "--load-in-4bit", "--method", "full")
    assert "full fine-tuning" in err and "--method lift" in err
    err = parse_error(capsys, "--load-in-8bit", "--weight-decay", "0.1")
    assert "--weight-decay 0.1 with --load-in-8bit" in err and "--weight-decay 0" in err


# -- QLoRA --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qlora(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("qlora") / "out"
    run_cli(tiny_model, out, "--method", "lora", "--load-in-4bit", "--max-steps", "3")
    return out


def test_qlora_runs_and_records(qlora):
    s = summary_of(qlora)
    assert s["quantized_base"]["bits"] == 4 and s["quantized_base"]["quant_type"] == "nf4"
    assert s["rss_high_water_mib"] > 0 and s["delta"]["changed_entries"] > 0
    assert s["peft_adapter"]["path"] is None and "lora" in s["peft_adapter"]["skipped"]


def test_qlora_model_folder_is_the_trained_model_in_float(tiny_model, qlora):
    """Merged into the dequantized base in fp32: the same function as the 4-bit base plus adapters."""
    merged = float_model(qlora / "model")
    config = json.loads((qlora / "model" / "config.json").read_text())
    assert "quantization_config" not in config
    assert_layout_of(tiny_model, qlora / "model")
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    trained = rebuild(tiny_model, qlora, "lora")
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, trained(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)


def test_qlora_delta_applies_to_the_dequantized_base(qlora):
    base, _ = export.load_run_base(str(qlora))
    lk.apply_delta(base, qlora / "delta.safetensors")
    merged = float_model(qlora / "model")
    assert all(torch.equal(v, merged.state_dict()[k]) for k, v in base.state_dict().items())


# -- LIFT over a 4-bit base ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lift4(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("lift4") / "out"
    run_cli(tiny_model, out, "--load-in-4bit", "--max-steps", "3")
    return out


def test_lift_4bit_runs_and_records(lift4):
    s = summary_of(lift4)
    q = s["quantized_base"]
    assert q["bits"] == 4 and q["trained_delta_entries"] > 0
    assert q["trained_delta_bytes"] == 8 * q["trained_delta_entries"]
    assert 0 < s["delta"]["changed_entries"] <= q["trained_delta_entries"]
    assert s["rss_high_water_mib"] > 0
    assert s["peft_adapter"]["path"] == "peft-adapter"


def test_lift_4bit_model_folder_holds_the_effective_weights(tiny_model, lift4):
    merged = float_model(lift4 / "model")
    assert "quantization_config" not in json.loads((lift4 / "model" / "config.json").read_text())
    assert_layout_of(tiny_model, lift4 / "model")
    trained = rebuild(tiny_model, lift4, "lift")
    state = merged.state_dict()
    layers = [(n, m) for n, m in trained.named_modules() if hasattr(m, "effective_weight")]
    assert layers
    for name, layer in layers:
        assert torch.equal(state[f"{name}.weight"], layer.effective_weight(torch.float32)), name


def test_lift_4bit_delta_applies_exactly(tiny_model, lift4):
    base, _ = export.load_run_base(str(lift4))
    lk.apply_delta(base, lift4 / "delta.safetensors")
    merged = float_model(lift4 / "model")
    assert all(torch.equal(v, merged.state_dict()[k]) for k, v in base.state_dict().items())
    # applying to the quantized model itself is refused with a message that says what to do instead
    with pytest.raises(lk.DeltaError, match="LIFTQuantLinear"):
        lk.apply_delta(rebuild(tiny_model, lift4, "lift"), lift4 / "delta.safetensors")


def test_lift_4bit_adapter_merges_on_the_dequantized_base(lift4):
    from peft import PeftModel

    base, _ = export.load_run_base(str(lift4))
    merged = PeftModel.from_pretrained(base, str(lift4 / "peft-adapter")).merge_and_unload()
    want = float_model(lift4 / "model").state_dict()
    wrong = sum(int((v != want[k]).sum()) for k, v in merged.state_dict().items())
    assert wrong == summary_of(lift4)["peft_adapter"]["inexact_entries"]


def test_lift_4bit_resume_equals_uninterrupted_run(tiny_model, tmp_path, monkeypatch):
    common = ["--load-in-4bit", "--max-steps", "4", "--save-every", "2", "--update-interval", "3"]
    run_cli(tiny_model, tmp_path / "whole", *common)
    crash_at_step(monkeypatch, 2, lambda: run_cli(tiny_model, tmp_path / "split", *common))
    run_cli(tiny_model, tmp_path / "split", *common, "--resume")
    losses = [[json.loads(line)["loss"] for line in open(tmp_path / run / "metrics.jsonl")
               if json.loads(line)["event"] == "train"] for run in ("whole", "split")]
    assert losses[0] == losses[1]
    with safe_open(str(tmp_path / "whole" / "delta.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "split" / "delta.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_lift_8bit_with_8bit_moments_and_magnitude_fp4(tiny_model, tmp_path):
    run_cli(tiny_model, tmp_path / "a", "--load-in-8bit", "--moment-bits", "8", "--max-steps", "2",
            "--no-peft-adapter")
    run_cli(tiny_model, tmp_path / "b", "--load-in-4bit", "--bnb-4bit-quant-type", "fp4", "--method", "magnitude",
            "--max-steps", "2", "--no-save-model")
    assert summary_of(tmp_path / "a")["quantized_base"]["bits"] == 8
    assert summary_of(tmp_path / "b")["quantized_base"]["quant_type"] == "fp4"


def test_resume_refuses_another_quantization(tiny_model, tmp_path):
    run_cli(tiny_model, tmp_path / "r", "--load-in-4bit", "--method", "lora", "--max-steps", "1")
    with pytest.raises(SystemExit) as exc:
        run_cli(tiny_model, tmp_path / "r", "--method", "lora", "--max-steps", "1", "--resume")
    assert "--load-in-4bit True (now False)" in str(exc.value.code)


def test_float_runs_record_rss_too(tiny_model, tmp_path):
    run_cli(tiny_model, tmp_path / "f", "--max-steps", "1", "--no-save-model", "--no-peft-adapter")
    s = summary_of(tmp_path / "f")
    assert s["rss_high_water_mib"] > 0 and s["quantized_base"] is None


def test_to_float_of_an_untrained_bnb_model_is_its_dequantized_weights(tiny_model):
    quant = quantize.Quant(4, "nf4", torch.float32)
    model, _ = model_io.load(model_io.resolve(tiny_model), torch.device("cpu"), quant)
    layer = model.model.layers[0].mlp.down_proj
    want = quantize.dequantize(layer)
    quantize.to_float(model)
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, want)
    assert not quantize.is_quantized(model) and getattr(model, "hf_quantizer", None) is None
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # a local model never reaches for the network


def test_export_rebuilds_the_model_folder_from_the_delta(qlora, tmp_path):
    """`lift-finetune export` reads the run's quantization from summary.json and applies the delta to the
    dequantized base: the same float model as the run wrote."""
    assert cli.main(["export", "--delta", str(qlora / "delta.safetensors"), "--output-dir", str(tmp_path / "x"),
                     "--no-peft-adapter"]) == 0
    rebuilt, written = float_model(tmp_path / "x" / "model"), float_model(qlora / "model")
    assert all(torch.equal(v, written.state_dict()[k]) for k, v in rebuilt.state_dict().items())
