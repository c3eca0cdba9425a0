"""The gradient a LIFT step applies: what the hooks make of ``p.grad``, and how the step reads it.

grad_hooks.py installs two autograd hooks on every LIFT weight; they call ``before_accumulate``
and ``after_accumulate`` here. After each backward a LIFT weight's gradient is

- in sparse-gradient mode, gathered at the selected entries (a :class:`GatheredGrad` as ``p.grad``,
  or, for row-sharded DTensor weights whose ``p.grad`` autograd owns, a buffer of the optimizer's);
- in dense mode, zeroed outside the selected entries (one pass, no memory),

so torch's tools (clip_grad_norm_, GradScaler, zero_grad) see in both modes the gradient the step
applies, and ``applied_grad`` hands it to the step. A weight whose selector scores the dense
gradient keeps it whole on the step that selects (the selection is made in step(), then).
Under DDP (replicated weights) gradients are averaged after these hooks, so they leave them alone;
lk.sparse_allreduce_hook sends only the selected entries.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .gathered_grad import GatheredGrad
from .validation import check_unchanged_shape


def has_grad(opt, p: Tensor) -> bool:
    return p.grad is not None or p in opt._sparse_grads


@torch.no_grad()
def before_accumulate(opt, p: Tensor) -> None:
    """Before a backward adds to p.grad: select if due, then make sure a gathered p.grad belongs to
    the current selection."""
    if opt.strategy.is_dtensor(p) or opt._waits_for_grad(p):
        return  # DTensor weights select after accumulation; gradient scorers in step()
    if opt.strategy.replicated():
        if opt.sparse_grad:
            raise RuntimeError("LIFTAdamW(sparse_grad=True) gathers gradients before DDP averages them; "
                               "under DDP use sparse_grad=False with lk.sparse_allreduce_hook(opt)")
        return
    opt._select_due_of(p)
    check_unchanged_shape(p, opt.state[p], opt._name_of)
    g = p.grad
    if isinstance(g, GatheredGrad) and not is_current(opt, g, p):
        if g.values.count_nonzero():
            raise RuntimeError(
                f"the gradient of {opt._name_of(p)} was gathered at the selection before a refresh "
                "and never cleared; call zero_grad() after every step() in sparse_grad=True mode")
        p.grad = None  # zero_grad(set_to_none=False) left zeros at the old entries


@torch.no_grad()
def after_accumulate(opt, p: Tensor) -> None:
    """Sparse mode: gather p.grad at the selected entries (freeing the dense gradient); dense mode:
    zero it outside them."""
    if opt.strategy.is_dtensor(p):
        if opt.sparse_grad:
            _gather_sharded(opt, p)
        return
    if p.grad is None or isinstance(p.grad, GatheredGrad) or opt._waits_for_grad(p):
        return
    if opt.strategy.replicated() or "idx" not in opt.state[p]:
        return
    idx = opt.state[p]["idx"].long()
    if opt.sparse_grad:
        p.grad = GatheredGrad(p.grad.reshape(-1).index_select(0, idx).float(), opt.state[p]["idx"], p)
    else:
        if not p.grad.is_contiguous():
            p.grad = p.grad.contiguous()
        flat = p.grad.view(-1)
        kept = flat.index_select(0, idx)
        flat.zero_()
        flat.index_copy_(0, idx, kept)


def _gather_sharded(opt, p: Tensor) -> None:
    """Sparse mode on a DTensor (FSDP2) weight: keep grad[idx] of the local rows in fp32."""
    if opt._waits_for_grad(p):
        return  # step() needs the whole accumulated gradient
    opt._select_due_of(p)
    if p.grad is None:
        return
    g = opt.strategy.local(p.grad).view(-1).index_select(0, opt.state[p]["idx"].long()).float()
    buf = opt._sparse_grads.get(p)
    opt._sparse_grads[p] = g if buf is None else buf.add_(g)
    p.grad = None


def is_current(opt, g: GatheredGrad, p: Tensor) -> bool:
    """Whether gathered gradient ``g`` was gathered at p's current selection."""
    idx = opt.state[p].get("idx")
    return idx is not None and (g.idx is idx or (g.idx.shape == idx.shape and torch.equal(g.idx, idx)))


def applied_grad(opt, p: Tensor) -> Tensor:
    """The gradient the step applies: gathered (k fp32 values) or the dense one."""
    if p in opt._sparse_grads:
        return opt._sparse_grads[p]
    g = p.grad
    if isinstance(g, GatheredGrad):
        if not is_current(opt, g, p):
            raise RuntimeError(
                f"the gradient of {opt._name_of(p)} was gathered at another selection than this "
                "optimizer's (another LIFTAdamW on the same weights, a load_state_dict after backward, "
                "or a refresh without zero_grad()); call zero_grad() and run backward again")
        return g.values
    return g
