"""Every lift_kernels op, defined once: schema, fake implementation and pure-torch reference.

Each op's reference (lift_kernels.reference, which documents the semantics) is registered here as
its CompositeExplicitAutograd kernel: what runs on any device where no backend registers a kernel
of its own. lift_kernels.ops.backends registers the Triton and compiled (lift_kernels._C) kernels
for the CPU and CUDA dispatch keys, and torch's dispatcher picks by the device of the arguments.
The fake implementations let FakeTensorMode and torch.compile trace the ops (shapes only).

The schemas live only here, not in C++: the ops must exist without the extension (LIFT_NO_NATIVE=1),
and the extension's kernels are plain functions that the native backend registers (csrc/ops.cpp).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import unset_fake_temporarily

from .. import reference
from ..reference.lowrank import fast_lowrank, work_dtype
from ..reference.select import SVD_MODES

NAMESPACE = "lift_kernels"
_lib = torch.library.Library(NAMESPACE, "DEF")


OPS: dict[str, Callable] = {}  # every op's name -> its reference kernel (the schema's signature)


def _define(schema: str, reference_fn: Callable, fake: Callable) -> None:
    name = schema.split("(", 1)[0]
    _lib.define(schema)
    _lib.impl(name, reference_fn, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_lib)
    OPS[name] = reference_fn


# ----------------------------------------------------------------------------- sparse_adamw_step
# AdamW on the selected entries params[i].view(-1)[idxs[i]] of every weight of a bucket, in place.
# grads[i] is dense (the weight's shape) or gathered (length k); masters is None (no fp32 master
# copies) or one entry per weight, None where that weight has none. step is the global step after
# increment. Mutated arguments are marked (a!)..(d!).
def _sparse_adamw_step_fake(params, grads, idxs, exp_avgs, exp_avg_sqs, masters=None, *, step, lr, beta1, beta2,
                            eps, weight_decay):
    return None  # updates its arguments in place, returns nothing


_define("sparse_adamw_step(Tensor(a!)[] params, Tensor[] grads, Tensor[] idxs, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, Tensor(d!)?[]? masters=None, *, int step, float lr, float beta1, float beta2, "
        "float eps, float weight_decay) -> ()",
        reference.sparse_adamw_step, _sparse_adamw_step_fake)


# ----------------------------------------------------------------------------------- remap_state
# Carry per-entry state from sorted flat indices old_idx to sorted new_idx; new entries get 0.
def _remap_state_fake(old_idx, new_idx, states):
    return [s.new_empty(new_idx.shape) for s in states]


_define("remap_state(Tensor old_idx, Tensor new_idx, Tensor[] states) -> Tensor[]",
        reference.remap_state, _remap_state_fake)


# ----------------------------------------------------------------------------- principal_weights
# Sorted int32 flat indices of the k largest (largest=False: smallest) |W'|, W' the best
# rank-lra_rank approximation of W (m, n), or of each matrix of a batch (b, m, n): result (k,) or
# (b, k). svd="exact" is a full SVD, always the reference's (the definition); svd="fast" the
# accurate randomized path seeded from `generator`.
def check_principal_weights_args(W: Tensor, k: int, lra_rank: int, svd: str) -> None:
    if W.dim() not in (2, 3):
        raise ValueError(f"W must be (m, n) or (b, m, n), got shape {tuple(W.shape)}")
    m, n = W.shape[-2:]
    if not 0 <= k <= m * n:
        raise ValueError(f"k must be in [0, m*n] = [0, {m * n}], got {k}")
    if not 1 <= lra_rank <= min(m, n):
        raise ValueError(f"lra_rank must be in [1, min(m, n)] = [1, {min(m, n)}], got {lra_rank}")
    if svd not in SVD_MODES:
        raise ValueError(f"svd must be one of {SVD_MODES}, got {svd!r}")


def draw_seed(generator: torch.Generator | None) -> int:
    """The seed a compiled kernel's random start is drawn from: one draw from ``generator``.

    A real number from the real generator even under FakeTensorMode (where .item() of a fake tensor
    raises): a fake run consumes the randomness a real one does. Outside fake mode the context
    manager does nothing, so the draw and the generator's state after it are a plain randint's."""
    with unset_fake_temporarily():
        return int(torch.randint(0, 2**62, (1,), generator=generator).item())


def _principal_weights_reference(W, k, lra_rank, svd="fast", largest=True, generator=None):
    check_principal_weights_args(W, k, lra_rank, svd)
    return reference.principal_weights(W, k, lra_rank, svd, largest, generator)


def _principal_weights_fake(W, k, lra_rank, svd="fast", largest=True, generator=None):
    check_principal_weights_args(W, k, lra_rank, svd)
    if svd == "fast":  # as the compiled kernels do; the reference draws its sketch instead
        draw_seed(generator)
    return W.new_empty((*W.shape[:-2], k), dtype=torch.int32)


_define('principal_weights(Tensor W, int k, int lra_rank, str svd="fast", bool largest=True, '
        "Generator? generator=None) -> Tensor",
        _principal_weights_reference, _principal_weights_fake)


# ----------------------------------------------- the compiled principal_weights and its two steps
# principal_weights(svd="fast") of a batch W (b, m, n) as the compiled kernels run it, from an int
# seed; and its two steps, hooks for tests and benchmarks: the block Krylov factors W ~= L R (fp32,
# fp64 for fp64 W), and the fused top-k of |L R| that never forms L R. Their references run the same
# algorithms in torch, from a generator of W's device seeded with `seed`.
def _seeded(W: Tensor, seed: int) -> torch.Generator:
    return torch.Generator(device=W.device).manual_seed(seed)


def _principal_weights_seeded_reference(W, k, lra_rank, largest, seed):
    return reference.principal_weights(W, k, lra_rank, "fast", largest, _seeded(W, seed))


def _principal_weights_seeded_fake(W, k, lra_rank, largest, seed):
    return W.new_empty((W.shape[0], k), dtype=torch.int32)


_define("_principal_weights_seeded(Tensor W, int k, int lra_rank, bool largest, int seed) -> Tensor",
        _principal_weights_seeded_reference, _principal_weights_seeded_fake)


def _lowrank_reference(W, rank, seed, passes, oversample):
    L, R = fast_lowrank(W, rank, passes=passes, oversample=oversample, generator=_seeded(W, seed))
    return L.contiguous(), R.contiguous()  # the layout of the fake's (and the compiled kernels') factors


def _lowrank_fake(W, rank, seed, passes, oversample):
    b, m, n = W.shape
    dtype = work_dtype(W)
    return W.new_empty((b, m, rank), dtype=dtype), W.new_empty((b, rank, n), dtype=dtype)


_define("_lowrank(Tensor W, int rank, int seed, int passes, int oversample) -> (Tensor, Tensor)",
        _lowrank_reference, _lowrank_fake)


def _topk_abs_product_reference(L, R, k, largest):
    return reference.topk_flat_indices((L @ R).abs_(), k, largest)


def _topk_abs_product_fake(L, R, k, largest):
    return L.new_empty((L.shape[0], k), dtype=torch.int32)


_define("_topk_abs_product(Tensor L, Tensor R, int k, bool largest) -> Tensor",
        _topk_abs_product_reference, _topk_abs_product_fake)

PUBLIC = ("sparse_adamw_step", "remap_state", "principal_weights")
