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
:class:`LIFTTrainerMixin` does the same for any Trainer subclass (TRL's trainers).
"""
from __future__ import annotations

from transformers import Trainer

from ..optim import LIFTAdamW


def _lift_optimizer(optimizer) -> LIFTAdamW | None:
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
    return inner if isinstance(inner, LIFTAdamW) else None


class LIFTTrainerMixin:
    """Makes a Trainer subclass clip, and log the norm, through LIFTAdamW.clip_grad_norm_.

    For trainers built on transformers.Trainer (TRL's SFTTrainer, DPOTrainer, GRPOTrainer, ...):
    ``class LIFTGRPOTrainer(LIFTTrainerMixin, GRPOTrainer): pass``. Every transformers release from
    4.57 clips (and, in 5.x, measures the logged norm) through ``self.accelerator.clip_grad_norm_``,
    inline in the loop (4.x) or in ``_clip_grad_norm`` / ``_get_grad_norm`` (5.x); wrapping that one
    call covers both.
    """

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        accelerate_clip = self.accelerator.clip_grad_norm_

        def clip_grad_norm_(parameters, max_norm, norm_type=2):
            opt = _lift_optimizer(self.optimizer)
            if opt is None:
                return accelerate_clip(parameters, max_norm, norm_type)
            # The Trainer passes model.parameters(): the optimizer's own parameters, which its
            # clip_grad_norm_ covers (selected entries of LIFT weights, all of the others).
            self.accelerator.unscale_gradients()  # fp16: what accelerate does before clipping
            return opt.clip_grad_norm_(max_norm, norm_type)

        self.accelerator.clip_grad_norm_ = clip_grad_norm_


class LIFTTrainer(LIFTTrainerMixin, Trainer):
    """A Trainer whose gradient clipping and norm logging cover LIFTAdamW's gathered gradients."""
