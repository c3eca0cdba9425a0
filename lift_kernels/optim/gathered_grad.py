"""GatheredGrad: a LIFT weight's gradient kept at its selected entries only, stored as ``p.grad``.

In sparse-gradient mode the dense gradient of a LIFT weight is replaced, right after it is
accumulated, by a GatheredGrad: a tensor subclass that reports the weight's shape and dtype (so
autograd accepts it as ``p.grad``) but holds only the k gathered fp32 values and the indices they
came from. Because it *is* ``p.grad``, torch's own tools reach it: ``clip_grad_norm_`` (and through
it HF Trainer and accelerate) takes its norm and scales it, ``GradScaler`` unscales and inf-checks it,
``zero_grad()`` / ``p.grad = None`` discard it, and the next micro-batch's dense gradient is added
into it (gathered at the same entries) by autograd's own accumulation.

Its entries outside the selection are zero by definition, so reductions over it (norms) and
elementwise in-place updates by scalars (scaling, clamping, zeroing) are exact. Anything that would
need the m*n values (indexing, reshaping, an optimizer other than LIFTAdamW) is refused with an
error that says why and what to do instead.
"""
from __future__ import annotations

import torch
from torch import Tensor

aten = torch.ops.aten

# In-place ops that act entrywise with scalar operands: applying them to the k values is exact
# (the absent entries are zeros and stay zeros under scaling and clamping around 0).
_ENTRYWISE_INPLACE = {aten.mul_.Tensor, aten.mul_.Scalar, aten.div_.Tensor, aten.div_.Scalar,
                      aten.clamp_.default, aten.clamp_.Tensor, aten.clamp_min_.default,
                      aten.clamp_max_.default, aten.zero_.default, aten.nan_to_num_.default}
_FOREACH_OK = {aten._foreach_mul_.Scalar, aten._foreach_mul_.Tensor, aten._foreach_mul_.List,
               aten._foreach_mul_.ScalarList, aten._foreach_div_.Scalar, aten._foreach_div_.Tensor,
               aten._foreach_div_.ScalarList, aten._foreach_zero_.default,
               aten._foreach_clamp_min_.Scalar, aten._foreach_clamp_max_.Scalar,
               aten._foreach_norm.Scalar, aten._amp_foreach_non_finite_check_and_unscale_.default}
# Whole-tensor reductions that ignore zeros: exact over the k values.
_NORMS = {aten.linalg_vector_norm.default, aten.norm.Scalar, aten.norm.ScalarOpt_dim, aten.sum.default}


class GatheredGrad(Tensor):
    """``p.grad`` of a LIFT weight in sparse-gradient mode: fp32 ``values`` at int32 ``idx``."""

    values: Tensor
    idx: Tensor

    @staticmethod
    def __new__(cls, values: Tensor, idx: Tensor, like: Tensor):
        r = Tensor._make_wrapper_subclass(cls, like.shape, dtype=like.dtype, device=values.device)
        r.values, r.idx = values, idx
        return r

    # A traceable wrapper subclass: torch's tools that walk tensor storages (MemTracker, FSDP's and
    # the compiler's flattening) see the k values and indices it holds, not m*n phantom entries.
    def __tensor_flatten__(self):
        return ["values", "idx"], self.dtype  # the weight's dtype; the values are fp32

    @staticmethod
    def __tensor_unflatten__(inner: dict, meta, outer_size, outer_stride):
        return GatheredGrad(inner["values"], inner["idx"], _Like(outer_size, meta))

    def __repr__(self) -> str:
        return (f"GatheredGrad(shape={tuple(self.shape)}, k={self.values.numel()} selected entries, "
                f"norm={float(self.values.norm()):.6g})")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten.detach.default or func is aten.alias.default:
            g = args[0]
            return GatheredGrad(g.values, g.idx, g)
        if func is aten.clone.default:
            g = args[0]
            return GatheredGrad(g.values.clone(), g.idx, g)
        if func in (aten.add_.Tensor, aten.add.Tensor) and isinstance(args[0], GatheredGrad):
            return _accumulate(func, args[0], args[1], kwargs.get("alpha", 1))
        if func in _NORMS:
            g = args[0]
            return func(g.values, *args[1:], **kwargs).to(g.dtype)
        if func in _ENTRYWISE_INPLACE and _scalars_only(args[1:], kwargs) and _keeps_zero(func, args, kwargs):
            func(args[0].values, *args[1:], **kwargs)
            return args[0]
        if (func in _FOREACH_OK and _scalars_only(args[1:], kwargs, allow_lists=True)
                and _keeps_zero(func, args, kwargs)):
            out = func(*[[_unwrap(t) for t in a] if isinstance(a, (list, tuple)) else a for a in args],
                       **kwargs)
            if func is aten._foreach_norm.Scalar:
                return [n.to(t.dtype) for n, t in zip(out, args[0])]
            return out
        raise NotImplementedError(
            f"{func} on a LIFT weight's gradient in sparse-gradient mode: LIFTAdamW(sparse_grad=True) "
            "keeps only the k selected entries of it (a GatheredGrad). Norms, scaling, clamping, "
            "zeroing and GradScaler work on it; for code that needs the whole gradient (or another "
            "optimizer on these weights), build LIFTAdamW with sparse_grad=False, or delete the "
            "sparse-gradient LIFTAdamW first (its hooks go away with it)")


class _Like:
    """Shape and dtype of the weight a GatheredGrad stands for, when only those are at hand."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = torch.Size(shape), dtype


def _unwrap(t):
    return t.values if isinstance(t, GatheredGrad) else t


def _keeps_zero(func, args, kwargs) -> bool:
    """A clamp is exact on the k values only if it leaves the absent entries (zeros) at zero."""
    name = func.__name__
    if "clamp" not in name:
        return True
    lo = kwargs.get("min", args[1] if len(args) > 1 else None)
    hi = kwargs.get("max", args[2] if len(args) > 2 else None)
    if "clamp_max" in name:
        lo, hi = None, lo
    return (lo is None or float(lo) <= 0.0) and (hi is None or float(hi) >= 0.0)


def _scalars_only(args, kwargs, allow_lists: bool = False) -> bool:
    """Whether the operands besides the gradients are numbers or one-element tensors."""
    def ok(a):
        if isinstance(a, GatheredGrad):
            return False
        if isinstance(a, Tensor):
            return a.numel() == 1
        if isinstance(a, (list, tuple)):
            return allow_lists and all(isinstance(x, GatheredGrad) or ok(x) for x in a)
        return True
    return all(ok(a) for a in list(args) + list(kwargs.values()))


def _accumulate(func, g: GatheredGrad, other, alpha) -> GatheredGrad:
    """g + alpha * other, with ``other`` a dense gradient (gathered at g's entries) or a GatheredGrad."""
    if isinstance(other, GatheredGrad):
        if other.idx is not g.idx and not torch.equal(other.idx, g.idx):
            raise RuntimeError("cannot add gradients gathered at two different selections")
        add = other.values
    elif isinstance(other, Tensor) and tuple(other.shape) == tuple(g.shape):
        add = other.reshape(-1).index_select(0, g.idx.long()).float()
    else:
        raise NotImplementedError(f"adding a {type(other).__name__} of shape "
                                  f"{tuple(getattr(other, 'shape', ()))} to a LIFT GatheredGrad")
    if func is aten.add_.Tensor:
        g.values.add_(add, alpha=alpha)
        return g
    return GatheredGrad(g.values.add(add, alpha=alpha), g.idx, g)
