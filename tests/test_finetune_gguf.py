"""The built-in GGUF model (SmolLM2) works with transformers' Trainer and save_pretrained (issue 12, item 7).

transformers marks a GGUF-loaded model as quantized although its weights are dequantized fp32;
lift_finetune.model.load must hand back a plain model.
"""
import contextlib
import io

import pytest
import torch

import smollm2
from lift_finetune import model as model_io


@pytest.fixture(scope="module")
def loaded():
    """(model, tokenizer) and what loading them wrote to stderr."""
    smollm2.require(full=True)
    pytest.importorskip("transformers")
    with contextlib.redirect_stderr(io.StringIO()) as err:  # where tqdm draws its bars
        model, tokenizer = model_io.load(model_io.builtin_source(), torch.device("cpu"))
    return model, tokenizer, err.getvalue()


@pytest.fixture(scope="module")
def smollm(loaded):
    return loaded[:2]


def test_conversion_draws_no_progress_bar(loaded):
    """transformers' "Converting and de-quantizing GGUF tensors" bar is silenced (issue 19, item 7)."""
    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils

    assert "GGUF tensors" not in loaded[2] and "it/s" not in loaded[2], loaded[2][-500:]
    assert modeling_gguf_pytorch_utils.tqdm is tqdm  # silenced only while loading: other bars still draw


def test_not_marked_quantized(smollm):
    model, _ = smollm
    assert getattr(model, "hf_quantizer", None) is None
    assert not getattr(model, "is_quantized", False)
    assert getattr(model.config, "quantization_config", None) is None
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_trainer_trains_one_step(smollm, tmp_path):
    from transformers import Trainer, TrainingArguments

    model, tokenizer = smollm
    trained = model.model.layers[0].mlp.down_proj.weight
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():  # one matrix keeps the optimizer small; the point is that Trainer accepts it
        p.requires_grad_(p is trained)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        enc = tokenizer(["What is 2 + 3? 5", "What is 7 - 4? 3"], padding="max_length", max_length=12,
                        return_tensors="pt")
        examples = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                     "labels": enc["input_ids"][i]} for i in range(2)]
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2,
                                 learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no",
                                 logging_strategy="no", disable_tqdm=True)
        Trainer(model=model, args=args, train_dataset=examples).train()
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed == {"model.layers.0.mlp.down_proj.weight"}
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(before[n])
                p.requires_grad_(flags[n])


def test_save_pretrained_round_trip(smollm, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = smollm
    model.save_pretrained(tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    assert getattr(again, "hf_quantizer", None) is None
    mine, theirs = model.state_dict(), again.state_dict()
    assert set(mine) == set(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_load_in_4bit_goes_through_a_folder(tmp_path, monkeypatch):
    """transformers refuses a quantization config with gguf_file; load() saves the dequantized model to a
    temporary folder and reloads it quantized (issue 20), leaving no folder behind."""
    pytest.importorskip("bitsandbytes")
    from lift_finetune import quantize

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # TMPDIR is read again
    model, _ = model_io.load(model_io.builtin_source(), torch.device("cpu"), quantize.Quant(4, "nf4", torch.float32))
    assert quantize.is_quantized(model) and type(model.lm_head) is torch.nn.Linear
    assert list(tmp_path.iterdir()) == []
