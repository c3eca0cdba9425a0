"""Scoring a fine-tuned delta for the learning-vs-forgetting study, per item so intervals can be drawn.

One base model stays loaded; each run's delta is added, the model scored, and the base weights put
back from a saved copy (a bit-exact reset whatever the delta's rounding). Learning: greedy exact
match on the built-in held-out problems, split into a validation part (learning-rate choice) and a
disjoint test part (reported). Forgetting: summed NLL per held-out docstring, so the perplexity
change can be bootstrapped over texts.

A run over a 4-bit base (lift-finetune --load-in-4bit) is scored from the merged float model it
writes (``score_folder``): its delta is relative to the dequantized base, not to the fp32 base held
here. ``check_folder`` confirms that folder is dequant(base) + delta, and ``score_quantized_base``
scores the untrained dequantized base, the reference that separates quantization from training.
"""
from __future__ import annotations

import glob
import os

import torch
from safetensors.torch import load_file

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
        self.model_spec = model
        self.model, self.tokenizer = model_io.load(model_io.resolve(model), device)  # as lift-finetune does
        self.model.requires_grad_(False)
        self.base_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.style = resolve_style(self.tokenizer, "auto")
        _, test = data.arithmetic_problems(_BUILTIN_TRAIN, _BUILTIN_TEST)
        self.problems = test[:n_problems]
        self.texts = heldout_text(n_texts)
        self._dequantized = None  # (state, quantization record) of the 4-bit base, loaded when first needed

    def score(self, delta_path: str | None) -> dict:
        """Per-problem correctness and per-text (NLL sum, tokens) of base + delta (the base if None)."""
        if delta_path is not None:
            lk.apply_delta(self.model, delta_path)
        try:
            return self._score_loaded()
        finally:
            self.model.load_state_dict(self.base_state)

    def score_folder(self, folder: str) -> dict:
        """As :meth:`score`, for the model saved in ``folder`` (save_pretrained's safetensors files)."""
        ignored = self._load_weights(folder_state(folder))
        try:
            return {**self._score_loaded(), "ignored_tensors": ignored}
        finally:
            self.model.load_state_dict(self.base_state)

    def score_quantized_base(self, flags: list[str]) -> dict:
        """As :meth:`score`, for the base quantized as lift-finetune ``flags`` quantize it, dequantized."""
        state, record = self.dequantized_base(flags)
        self._load_weights(state)
        try:
            return {**self._score_loaded(), "quantized_base": record}
        finally:
            self.model.load_state_dict(self.base_state)

    def check_folder(self, folder: str, delta_path: str, low_rank: bool = False) -> dict:
        """How far the saved model in ``folder`` is from dequantized base + ``delta_path``.

        apply_delta refuses a delta whose recorded base fingerprints do not match the model, so a
        successful apply also shows the delta was taken against this dequantized base. Independently of
        the delta file: how many entries differ from the dequantized base (LIFT: at most its budget) and,
        with ``low_rank`` (QLoRA), the largest numerical rank of a matrix's change (at most LoRA's rank).
        """
        saved = folder_state(folder)
        base = self.dequantized_base(None)[0]
        changed, max_rank = 0, 0
        for name, w in saved.items():
            if name in base and w.shape == base[name].shape:
                change = w.float() - base[name].float()
                changed += int((change != 0).sum())
                if low_rank and change.dim() == 2 and change.any():
                    max_rank = max(max_rank, int(torch.linalg.matrix_rank(change)))
        self._load_weights(base)
        try:
            lk.apply_delta(self.model, delta_path)
            now = self.model.state_dict()
            differing, largest = 0, 0.0
            for name, w in saved.items():
                if name not in now:
                    continue  # a tensor the model has no place for (see _load_weights)
                diff = (now[name].float() - w.float()).abs()
                differing += int((diff > 0).sum())
                largest = max(largest, float(diff.max()) if diff.numel() else 0.0)
        finally:
            self.model.load_state_dict(self.base_state)
        return {"entries_differing": differing, "max_abs_difference": largest, "changed_vs_dequantized_base": changed,
                **({"max_rank_of_change": max_rank} if low_rank else {})}

    def dequantized_base(self, flags: list[str] | None) -> tuple[dict, dict]:
        """({name: tensor} of the dequantized 4-bit base, its quantization record); loaded once per process
        (``flags`` the first time: the lift-finetune flags that quantize it)."""
        if self._dequantized is None:
            from lift_finetune import cli, export

            argv = ["--method", "lift", *(flags or ["--load-in-4bit"])]
            argv += ["--model", self.model_spec] if self.model_spec else []
            quant = export.run_quant(vars(cli.parse(argv)))
            model, _ = export.load_base(model_io.resolve(self.model_spec), quant)  # the run's base, as it loads it
            self._dequantized = ({k: v.detach().to(self.device, copy=True) for k, v in model.state_dict().items()},
                                 quant.as_dict())
            del model
        return self._dequantized

    def _load_weights(self, state: dict) -> list[str]:
        """Load a full state; only weights tied to another (lm_head to the embedding) may be absent, since
        an absent trained weight would silently score the base's. Tensors the model has no place for are
        left out, as from_pretrained leaves them out when it loads the folder; returns their names."""
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        ptrs = {v.data_ptr() for k, v in self.model.state_dict().items() if k in state}
        untied = [k for k in missing if self.model.state_dict()[k].data_ptr() not in ptrs]
        if untied:
            self.model.load_state_dict(self.base_state)
            raise ValueError(f"saved model does not fit the base: missing {untied[:5]} ({len(untied)} in all)")
        return list(unexpected)

    def _score_loaded(self) -> dict:
        _, records = accuracy(self.model, self.tokenizer, self.problems, self.style, self.device,
                              batch_size=self.batch_size, max_new_tokens=self.max_new_tokens, desc="score")
        nll, tokens = self._text_nll()
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


def folder_state(folder: str) -> dict:
    """Every tensor of the safetensors files save_pretrained wrote in ``folder`` (one file or shards)."""
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no safetensors files in {folder} (was the run made with --save-model?)")
    state = {}
    for path in files:
        state.update(load_file(path))
    return state
