"""Held-out accuracy by greedy generation and exact match of the final answer; text perplexity.

The answer of a generation is its last number (arithmetic, MATH-10K); where the reference is not a
number (Commonsense-170K answers such as "option1" or "true"), it is its last word.
"""
from __future__ import annotations

import contextlib
import math
import re

import torch
from tqdm.auto import tqdm

from .data import Example
from .features import prompt_ids, prompt_text

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_WORD = re.compile(r"[A-Za-z0-9_]+")


def last_number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:  # e.g. "1,2," cut oddly
        return None


def reference_answer(ex: Example) -> str:
    return ex.answer if ex.answer is not None else ex.output


def is_correct(generated: str, reference: str) -> bool:
    want = last_number(reference)
    if want is not None:
        got = last_number(generated)
        return got is not None and math.isclose(got, want, rel_tol=0.0, abs_tol=1e-6)
    want_words, got_words = _WORD.findall(reference.lower()), _WORD.findall(generated.lower())
    return bool(want_words) and bool(got_words) and got_words[-1] == want_words[-1]


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on an accelerator when asked; fp32 otherwise."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _stop_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate(model, tokenizer, examples: list[Example], style: str, device: torch.device, *,
             batch_size: int, max_new_tokens: int, bf16: bool = False, desc: str = "eval") -> list[str]:
    """Greedy completions of each example's prompt, in the order of ``examples``."""
    was_training = model.training
    model.eval()
    encoded = [prompt_ids(tokenizer, prompt_text(tokenizer, ex, style), style) for ex in examples]
    # Prompts of similar length share a batch, so little compute goes to padding.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out = [""] * len(examples)
    pad, stop = tokenizer.pad_token_id, _stop_ids(model, tokenizer)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        chunk = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in chunk)
        # Left padding: every prompt ends where generation starts.
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]):] = 1
        with autocast(device, bf16):
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=stop,
                                 temperature=None, top_p=None, top_k=None)
        for row, i in enumerate(chunk):
            out[i] = tokenizer.decode(gen[row, width:], skip_special_tokens=True)
    model.train(was_training)
    return out


def accuracy(model, tokenizer, examples: list[Example], style: str, device: torch.device, **kwargs):
    """(exact-match accuracy, per-example records) over ``examples``."""
    texts = generate(model, tokenizer, examples, style, device, **kwargs)
    records = [{"prompt": ex.instruction, "reference": reference_answer(ex), "generated": text,
                "correct": is_correct(text, reference_answer(ex))} for ex, text in zip(examples, texts)]
    return sum(r["correct"] for r in records) / max(1, len(records)), records


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], device: torch.device, *, max_length: int = 256,
               batch_size: int = 8) -> float:
    """Token-weighted perplexity of ``texts`` (each cut to ``max_length`` tokens)."""
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                        truncation=True, max_length=max_length).to(device)
        logits = model(**enc).logits.float()
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                 ignore_index=-100, reduction="sum")
        nll += float(loss)
        count += int((labels[:, 1:] != -100).sum())
    model.train(was_training)
    return math.exp(nll / max(1, count))
