"""Scoring a fine-tuned delta for the learning-vs-forgetting study, per item so intervals can be drawn.

One base model stays loaded; each run's delta is added, the model scored, and the base weights put
back from a saved copy (a bit-exact reset whatever the delta's rounding). Learning: greedy exact
match on the built-in held-out problems, split into a validation part (learning-rate choice) and a
disjoint test part (reported). Forgetting: summed NLL per held-out docstring, so the perplexity
change can be bootstrapped over texts.
"""
from __future__ import annotations

import torch

import lift_kernels as lk
from finetune_common import heldout_text
from lift_finetune import data, model as model_io
from lift_finetune.evaluate import accuracy
from lift_finetune.features import resolve_style

_BUILTIN_TRAIN, _BUILTIN_TEST = 5000, 500  # as lift-finetune builds the built-in set (run.py)


class Scorer:
    def __init__(self, device: torch.device, n_problems: int, n_texts: int, *, max_new_tokens: int,
                 model: str | None = None, text_tokens: int = 256, batch_size: int = 60):
        self.device, self.max_new_tokens, self.text_tokens, self.batch_size = (
            device, max_new_tokens, text_tokens, batch_size)
        self.model, self.tokenizer = model_io.load(model_io.resolve(model), device)  # as lift-finetune does
        self.model.requires_grad_(False)
        self.base_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.style = resolve_style(self.tokenizer, "auto")
        _, test = data.arithmetic_problems(_BUILTIN_TRAIN, _BUILTIN_TEST)
        self.problems = test[:n_problems]
        self.texts = heldout_text(n_texts)

    def score(self, delta_path: str | None) -> dict:
        """Per-problem correctness and per-text (NLL sum, tokens) of base + delta (the base if None)."""
        if delta_path is not None:
            lk.apply_delta(self.model, delta_path)
        try:
            _, records = accuracy(self.model, self.tokenizer, self.problems, self.style, self.device,
                                  batch_size=self.batch_size, max_new_tokens=self.max_new_tokens, desc="score")
            nll, tokens = self._text_nll()
        finally:
            self.model.load_state_dict(self.base_state)
        return {"correct": [int(r["correct"]) for r in records], "generated": [r["generated"] for r in records],
                "text_nll": nll, "text_tokens": tokens}

    @torch.no_grad()
    def _text_nll(self, batch_size: int = 8) -> tuple[list[float], list[int]]:
        """Summed next-token NLL and predicted-token count of each text (cut to ``text_tokens``)."""
        nll, tokens = [], []
        for start in range(0, len(self.texts), batch_size):
            enc = self.tokenizer(self.texts[start:start + batch_size], return_tensors="pt", padding=True,
                                 truncation=True, max_length=self.text_tokens).to(self.device)
            logits = self.model(**enc).logits.float()
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100,
                                                     reduction="none")
            nll += loss.sum(dim=1).tolist()
            tokens += (labels != -100).sum(dim=1).tolist()
        return nll, tokens
