"""The autograd hooks of LIFTAdamW on its LIFT weights, holding the optimizer weakly.

Each LIFT weight gets a hook before gradient accumulation (select if due; drop a cleared gathered
gradient of an older selection) and one after it (gather or mask the accumulated gradient); what
they do is applied_grad.py's. The hooks
reach the optimizer through a weak reference and are removed when it is garbage-collected, so a
deleted optimizer neither stays alive nor keeps acting on gradients. Only the newest LIFTAdamW built
on a weight acts on it (a notebook cell run twice, a retry after an exception): the hooks of an
older one, still alive, stand aside.
"""
from __future__ import annotations

import weakref

from torch import Tensor
from torch.utils.weak import WeakTensorKeyDictionary

from . import applied_grad

# LIFT weight -> weak reference to the LIFTAdamW whose hooks act on it (the newest one built on it).
_OWNER = WeakTensorKeyDictionary()


def owner(p: Tensor):
    ref = _OWNER.get(p)
    return ref() if ref is not None else None


def claim(opt, p: Tensor) -> None:
    """Make ``opt``'s hooks the ones that act on ``p`` (called once opt is fully built, so that a
    constructor that raises halfway leaves the previous optimizer in charge)."""
    _OWNER[p] = weakref.ref(opt)


def install(opt, p: Tensor, handles: list) -> None:
    """Hook ``p`` for ``opt``: applied_grad's ``before_accumulate(opt, p)`` and
    ``after_accumulate(opt, p)``; they act once ``claim(opt, p)`` has been called."""
    opt_ref, p_ref = weakref.ref(opt), weakref.ref(p)

    def acting():
        o, q = opt_ref(), p_ref()
        return (o, q) if o is not None and q is not None and owner(q) is o else (None, None)

    def before(grad: Tensor) -> None:
        o, q = acting()
        if o is not None:
            applied_grad.before_accumulate(o, q)

    def after(q: Tensor) -> None:
        o, _ = acting()
        if o is not None:
            applied_grad.after_accumulate(o, q)

    handles.append(p.register_hook(before))
    handles.append(p.register_post_accumulate_grad_hook(after))


def remove_when_collected(opt, handles: list) -> None:
    """Remove ``handles`` once ``opt`` is garbage-collected (the callback must not refer to opt)."""
    weakref.finalize(opt, _remove, handles)


def _remove(handles: list) -> None:
    for h in handles:
        h.remove()
    handles.clear()
