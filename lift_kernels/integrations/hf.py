"""Hugging Face Trainer with LIFTAdamW.

``transformers.Trainer(model, args, optimizers=(LIFTAdamW(...), scheduler))`` works as it is when
LIFTAdamW keeps dense gradients (the default): gradient accumulation, clipping and schedulers go
through the usual paths, and clipping takes the norm of the whole gradient, as for any optimizer.

With ``sparse_grad=True`` the dense gradients of LIFT weights are gone after backward, so the
Trainer's own clipping (over ``model.parameters()``) cannot see them. :class:`LIFTTrainer` routes
clipping and the logged gradient norm through ``LIFTAdamW.clip_grad_norm_``, which covers the
gathered gradients; it gives the same trajectory in sparse- and dense-gradient mode.
"""
from __future__ import annotations

from transformers import Trainer

from ..optim import LIFTAdamW


def _lift_optimizer(optimizer) -> LIFTAdamW | None:
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
    return inner if isinstance(inner, LIFTAdamW) else None


class LIFTTrainer(Trainer):
    """A Trainer whose gradient clipping and norm logging cover LIFTAdamW's gathered gradients."""

    def _clip_grad_norm(self, model):
        opt = _lift_optimizer(self.optimizer)
        if opt is None:
            return super()._clip_grad_norm(model)
        return opt.clip_grad_norm_(self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        opt = _lift_optimizer(self.optimizer)
        if opt is None or grad_norm is not None:
            return super()._get_grad_norm(model, grad_norm=grad_norm)
        return opt.clip_grad_norm_(float("inf"))
