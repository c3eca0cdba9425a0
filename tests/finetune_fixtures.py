"""A tiny but real transformers model for the lift-finetune tests.

A LlamaForCausalLM from a small config with a byte-level BPE tokenizer trained on the built-in
word problems, plus a ChatML chat template like SmolLM2's: every code path of the CLI runs (chat
prompts, generation, LoRA through peft) in about a second per run.
"""
from __future__ import annotations

import torch

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tiny_model(folder: str) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from lift_finetune.data import arithmetic_problems

    train, _ = arithmetic_problems(300, 0)
    texts = [f"{ex.instruction} {ex.output}" for ex in train]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", eos_token="<|im_end|>",
                                        pad_token="<|im_end|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=len(tokenizer), max_position_embeddings=256,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# Ranks that fit the tiny model's smallest matrix (k_proj, 16 x 32: at most rank 10).
SMALL = ["--rank", "2", "--lra-rank", "2", "--batch-size", "4", "--max-eval", "6", "--max-new-tokens", "4",
         "--eval-batch-size", "8", "--device", "cpu"]


def run_cli(model, out, *extra):
    from lift_finetune import cli

    return cli.main(["--model", model, "--output-dir", str(out), *SMALL, *extra])


def crash_at_step(monkeypatch, step: int, run) -> None:
    """Call ``run()`` with training raising at optimizer step ``step`` (0-based), as a crash would."""
    import pytest

    from lift_finetune import train as train_module

    real = train_module._step_batches

    def crashing(features, cfg, at, pad_id):
        if at == step:
            raise RuntimeError("simulated crash")
        return real(features, cfg, at, pad_id)

    monkeypatch.setattr(train_module, "_step_batches", crashing)
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            run()
    finally:
        monkeypatch.setattr(train_module, "_step_batches", real)
