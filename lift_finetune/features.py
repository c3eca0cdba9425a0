"""From examples to token tensors: prompt formatting, response-only labels, padded batches.

Training and evaluation build the prompt with the same function, so the base model is evaluated in
exactly the format the fine-tuned one learned.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import Example

IGNORE = -100  # label of positions that carry no loss (prompt and padding), as torch's cross_entropy expects

# The template of the paper's LLaMA runs (LLM-Adapters' Alpaca prompt), used for tokenizers without a
# chat template (base models).
_ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                      "context. Write a response that appropriately completes the request.\n\n"
                      "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
_ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes "
           "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")

PROMPT_STYLES = ("auto", "chat", "alpaca")


def resolve_style(tokenizer, style: str) -> str:
    """``auto`` is the model's own chat template where it has one (instruct models), else Alpaca."""
    if style == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
    if style == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("--prompt-style chat: this tokenizer has no chat template; use --prompt-style alpaca")
    return style


def _user_text(ex: Example) -> str:
    return f"{ex.instruction}\n\n{ex.input}" if ex.input else ex.instruction


def prompt_text(tokenizer, ex: Example, style: str) -> str:
    """The text the model sees before its response."""
    if style == "chat":
        return tokenizer.apply_chat_template([{"role": "user", "content": _user_text(ex)}],
                                             tokenize=False, add_generation_prompt=True)
    if ex.input:
        return _ALPACA_WITH_INPUT.format(instruction=ex.instruction, input=ex.input)
    return _ALPACA.format(instruction=ex.instruction)


def response_text(tokenizer, ex: Example, style: str, prompt: str) -> str:
    """The text the model learns to produce after ``prompt``, including its end-of-turn marker."""
    if style == "chat":
        full = tokenizer.apply_chat_template([{"role": "user", "content": _user_text(ex)},
                                              {"role": "assistant", "content": ex.output}], tokenize=False)
        if full.startswith(prompt):  # the template's own closing of the turn (e.g. "<|im_end|>\n")
            return full[len(prompt):]
    return ex.output + (tokenizer.eos_token or "")


def prompt_ids(tokenizer, prompt: str, style: str) -> list[int]:
    # Chat templates already contain any BOS token; the Alpaca text needs the tokenizer's.
    return tokenizer(prompt, add_special_tokens=(style == "alpaca"))["input_ids"]


@dataclass(frozen=True)
class Features:
    input_ids: list[int]
    labels: list[int]


def encode(tokenizer, examples: list[Example], style: str, max_length: int) -> tuple[list[Features], int]:
    """Token ids with labels only on the response; also the number of examples dropped.

    A sequence longer than ``max_length`` is cut at the end; an example whose prompt alone fills
    ``max_length`` has nothing left to learn and is dropped.
    """
    out, dropped = [], 0
    for ex in examples:
        prompt = prompt_text(tokenizer, ex, style)
        p_ids = prompt_ids(tokenizer, prompt, style)
        r_ids = tokenizer(response_text(tokenizer, ex, style, prompt), add_special_tokens=False)["input_ids"]
        ids = (p_ids + r_ids)[:max_length]
        labels = ([IGNORE] * len(p_ids) + r_ids)[:max_length]
        if all(label == IGNORE for label in labels):
            dropped += 1
            continue
        out.append(Features(ids, labels))
    return out, dropped


def collate(batch: list[Features], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (IGNORE on padding)."""
    width = max(len(f.input_ids) for f in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, f in enumerate(batch):
        n = len(f.input_ids)
        ids[i, :n] = torch.tensor(f.input_ids)
        labels[i, :n] = torch.tensor(f.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
