"""Hugging Face Trainer with LIFTAdamW.

``transformers.Trainer(model, args, optimizers=(LIFTAdamW(...), scheduler))`` works as it is in both
memory modes: its clipping (``max_grad_norm``, through ``accelerator.clip_grad_norm_`` and torch's
``clip_grad_norm_``) sees the gradient LIFTAdamW applies, since dense mode zeroes a LIFT weight's
gradient outside the selection and ``sparse_grad=True`` keeps the gathered entries as ``p.grad``
(a GatheredGrad). The norm is the same in both modes and equals ``LIFTAdamW.clip_grad_norm_``'s.

:class:`LIFTTrainer` routes clipping and the logged gradient norm through
``LIFTAdamW.clip_grad_norm_`` itself. It differs from a plain Trainer only for
``selector="gradient"`` on the steps that select (the hooks keep the whole gradient for the
selection, which LIFTAdamW.clip_grad_norm_ makes first and then clips at the new entries).
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
