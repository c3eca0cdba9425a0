"""The training loop: gradient accumulation, LR schedule, progress bar, checkpoints and resume.

The data order is a function of (seed, epoch) alone, so a resumed run sees exactly the batches the
uninterrupted run would have seen from the checkpoint's step on.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from . import checkpoint
from .evaluate import autocast
from .features import IGNORE, Features, collate


@dataclass
class LoopConfig:
    batch_size: int
    grad_accum: int
    max_steps: int
    max_grad_norm: float
    bf16: bool
    seed: int
    save_every: int          # 0: only at the end
    output_dir: str


def steps_per_epoch(n_examples: int, batch_size: int, grad_accum: int) -> int:
    # The last incomplete step of an epoch is dropped, so every step averages the same number of examples.
    return n_examples // (batch_size * grad_accum)


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def _step_batches(features: list[Features], cfg: LoopConfig, step: int, pad_id: int) -> list[dict]:
    """The micro-batches of optimizer step ``step`` (0-based)."""
    per_step = cfg.batch_size * cfg.grad_accum
    spe = steps_per_epoch(len(features), cfg.batch_size, cfg.grad_accum)
    order = _epoch_order(len(features), cfg.seed, step // spe)
    start = (step % spe) * per_step
    chosen = order[start:start + per_step]
    return [collate([features[i] for i in chosen[j:j + cfg.batch_size]], pad_id)
            for j in range(0, per_step, cfg.batch_size)]


def _loss_sum(model: nn.Module, batch: dict, device: torch.device, bf16: bool) -> torch.Tensor:
    """Summed next-token cross-entropy over the response tokens of ``batch``."""
    with autocast(device, bf16):
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
    labels = batch["labels"][:, 1:].to(device)
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(),
                                             ignore_index=IGNORE, reduction="sum")


def train(model: nn.Module, optimizer, scheduler, features: list[Features], cfg: LoopConfig, *,
          device: torch.device, pad_id: int, start_step: int, history: list[dict], extra: dict) -> list[dict]:
    """Run steps ``start_step`` .. ``cfg.max_steps``; appends one record per step to ``history``.

    ``extra`` is stored in every checkpoint (run fingerprint, base accuracy) with the history.
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
    for step in range(start_step, cfg.max_steps):
        began = time.perf_counter()
        batches = _step_batches(features, cfg, step, pad_id)
        # Normalise by the response tokens of the whole step, so accumulation equals one large batch.
        n_tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
        n_input = sum(int(b["attention_mask"].sum()) for b in batches)
        total = 0.0
        for batch in batches:
            loss = _loss_sum(model, batch, device, cfg.bf16) / n_tokens
            loss.backward()
            loss = loss.detach()
            total += loss.item()
        grad_norm = None
        if cfg.max_grad_norm > 0:
            # LIFTAdamW clips the gradient it applies (README, "Memory modes"); other methods all of it.
            clip = getattr(optimizer, "clip_grad_norm_", None)
            grad_norm = float(clip(cfg.max_grad_norm) if clip is not None
                              else torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - began
        history.append({"step": step + 1, "loss": total, "lr": float(lr), "grad_norm": grad_norm,
                        "loss_tokens": n_tokens, "input_tokens": n_input, "seconds": seconds})
        bar.set_postfix(loss=f"{total:.4f}", lr=f"{float(lr):.2e}", tok_s=f"{n_input / seconds:.0f}")
        bar.update(1)
        done = step + 1
        if done == cfg.max_steps or (cfg.save_every and done % cfg.save_every == 0):
            checkpoint.save(cfg.output_dir, done, model, optimizer, scheduler,
                            {**extra, "history": history}, device)
    bar.close()
    return history
