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
from ..reference.select import SVD_MODES, full_rank

NAMESPACE = "lift_kernels"
_lib = torch.library.Library(NAMESPACE, "DEF")


OPS: dict[str, Callable] = {}  # every op's name -> its reference kernel (the schema's signature)
DOCS: dict[str, str] = {}  # every public op's name -> its docstring (lift_kernels.ops.public attaches it)


def _define(schema: str, reference_fn: Callable, fake: Callable, doc: str | None = None,
            differentiable: bool = True) -> None:
    name = schema.split("(", 1)[0]
    _lib.define(schema)
    _lib.impl(name, reference_fn, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_lib)
    if not differentiable:
        _lib.impl(name, _below_autograd(name), "Autograd")
    OPS[name] = reference_fn
    if doc is not None:
        DOCS[name] = doc


def _below_autograd(name: str) -> Callable:
    """The Autograd kernel of an op without a derivative (a selection): runs its kernel below autograd,
    as torch's own kernels of argmax or topk's indices run, so its results never require grad and its
    kernels may use out= ops on a weight that does. Without it torch's fallback for ops with no
    autograd formula redispatches with autograd still on for the ops inside the kernel (the native
    fast path's mm(out=) then refuses a weight with requires_grad=True)."""
    def kernel(*args, **kwargs):
        with torch._C._AutoDispatchBelowADInplaceOrView():
            return getattr(getattr(torch.ops, NAMESPACE), name).default(*args, **kwargs)
    kernel.__name__ = f"{name}_autograd"
    return kernel


# ----------------------------------------------------------------------------- sparse_adamw_step
# Mutated arguments are marked (a!)..(d!).
_SPARSE_ADAMW_STEP_DOC = """AdamW on the selected entries of a bucket of weights, in place (LIFT's Eq. 3).

For every weight i, updates ``params[i].view(-1)[idxs[i]]`` and its moments as torch.optim.AdamW's
single-tensor step updates them (decoupled weight decay, bias correction by the global ``step``); the
other entries are not touched. One call (one kernel launch on an accelerator, no host sync) for the
whole bucket.

Args:
    params: the weights, any shapes, contiguous fp32, bf16 or fp16. Updated in place.
    grads: per weight, its dense gradient (the weight's shape) or the already gathered gradient of
        its selected entries (length k_i); fp32, bf16 or fp16.
    idxs: per weight, the selected entries as sorted int32 flat indices (row * n + col), length k_i.
    exp_avgs, exp_avg_sqs: per weight, Adam's first and second moments of the selected entries,
        fp32 vectors of length k_i. Updated in place.
    masters: None, or per weight an fp32 copy of its selected entries (length k_i), or None for a
        weight without one: the update goes to the copy and is rounded into the bf16/fp16 weight.
        Updated in place.
    step: the global step t after increment (>= 1); the bias correction uses it, not an entry's age.
    lr, beta1, beta2, eps, weight_decay: AdamW's hyperparameters, runtime values (changing them never
        recompiles a kernel).

Returns None. Runs the backend chosen for the tensors' device (see ``lk.info()``); every backend
agrees with the pure-torch reference, lift_kernels.reference.sparse_adamw_step, to rounding.
"""


def _sparse_adamw_step_fake(params, grads, idxs, exp_avgs, exp_avg_sqs, masters=None, *, step, lr, beta1, beta2,
                            eps, weight_decay):
    return None  # updates its arguments in place, returns nothing


_define("sparse_adamw_step(Tensor(a!)[] params, Tensor[] grads, Tensor[] idxs, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, Tensor(d!)?[]? masters=None, *, int step, float lr, float beta1, float beta2, "
        "float eps, float weight_decay) -> ()",
        reference.sparse_adamw_step, _sparse_adamw_step_fake, _SPARSE_ADAMW_STEP_DOC)


# ------------------------------------------------------------------------ sparse_adamw8bit_step
_SPARSE_ADAMW8BIT_STEP_DOC = """AdamW on the selected entries of a bucket of weights, moments held in 8 bits, in place.

As ``sparse_adamw_step``, with each weight's two moments stored as uint8 codes (length k_i) and fp32
scales, one per block of 256 consecutive entries (ceil(k_i / 256)): the moment of entry j reads back
as ``book[code[j]] * scale[j // 256]``. Per weight and step: read the moments back, take the fp32
AdamW step (the update uses the new moments before they are rounded), store the new moments: each
block's scale is its largest |value|, each code the nearest book value of value / scale (ties to
the lower code). lift_kernels.reference.moment_codes defines the books and the rounding.

Args:
    params, grads, idxs, masters, step, lr, beta1, beta2, eps, weight_decay: as ``sparse_adamw_step``.
    exp_avg_codes, exp_avg_sq_codes: per weight, uint8 codes of the first and second moments (k_i,).
        Updated in place.
    exp_avg_scales, exp_avg_sq_scales: per weight, fp32 block scales (ceil(k_i / 256),). Updated in place.
    exp_avg_book, exp_avg_sq_book: the two code books, sorted fp32 (256,), on the weights' device.

Returns None. Every backend agrees with lift_kernels.reference.sparse_adamw8bit_step to the rounding
of the fp32 arithmetic (a code may differ by one where a value falls on a rounding boundary).
"""


def _sparse_adamw8bit_step_fake(params, grads, idxs, exp_avg_codes, exp_avg_scales, exp_avg_sq_codes,
                                exp_avg_sq_scales, masters=None, *, exp_avg_book, exp_avg_sq_book, step, lr,
                                beta1, beta2, eps, weight_decay):
    return None  # updates its arguments in place, returns nothing


_define("sparse_adamw8bit_step(Tensor(a!)[] params, Tensor[] grads, Tensor[] idxs, Tensor(b!)[] exp_avg_codes, "
        "Tensor(c!)[] exp_avg_scales, Tensor(d!)[] exp_avg_sq_codes, Tensor(e!)[] exp_avg_sq_scales, "
        "Tensor(f!)?[]? masters=None, *, Tensor exp_avg_book, Tensor exp_avg_sq_book, int step, float lr, "
        "float beta1, float beta2, float eps, float weight_decay) -> ()",
        reference.sparse_adamw8bit_step, _sparse_adamw8bit_step_fake, _SPARSE_ADAMW8BIT_STEP_DOC)


# ----------------------------------------------------------------------------------- remap_state
_REMAP_STATE_DOC = """Carry per-entry optimizer state from one selection of a weight to the next.

An entry selected before and after keeps its value; a newly selected entry starts at 0. Works by
binary search over ``old_idx``: memory O(k), never m x n (Algorithm 1, lines 5-11).

Args:
    old_idx: the previous selection, sorted int32 flat indices, shape (k_old,).
    new_idx: the new selection of the same weight, sorted int32 flat indices, shape (k_new,).
    states: vectors of length k_old aligned with ``old_idx`` (e.g. exp_avg, exp_avg_sq, master), any
        floating dtype.

Returns:
    One new tensor per state, shape (k_new,), with the state's dtype and device, aligned with
    ``new_idx``. The inputs are not changed.
"""


def _remap_state_fake(old_idx, new_idx, states):
    return [s.new_empty(new_idx.shape) for s in states]


_define("remap_state(Tensor old_idx, Tensor new_idx, Tensor[] states) -> Tensor[]",
        reference.remap_state, _remap_state_fake, _REMAP_STATE_DOC)


# --------------------------------------------------------------------------- sampled_weight_grad
_SAMPLED_WEIGHT_GRAD_DOC = """A linear layer's weight gradient at chosen entries only (SDDMM), in fp32.

For y = x @ W.T with W (m, n), the gradient of W is grad_out.T @ x; this forms only its entries at
``idx``: ``values[j] = sum_t grad_out[t, idx[j] // n] * x[t, idx[j] % n]``, accumulated in fp32,
never the (m, n) product. LIFT over a quantized base uses it for the gradient of its sparse delta.

Args:
    grad_out: the gradient of the layer's output, (T, m); fp32, bf16, fp16 or fp64.
    x: the layer's input, (T, n); a floating dtype, on grad_out's device.
    idx: int32 flat indices (row * n + col) into m * n, shape (k,); any order, 0 <= idx < m * n.

Returns:
    fp32 (k,), on grad_out's device; zeros where T is 0, empty where k is 0.

Raises ValueError naming the argument when a shape, dtype, device or index is out of range.
"""


def check_sampled_weight_grad_args(grad_out: Tensor, x: Tensor, idx: Tensor) -> None:
    """The checks that need no data (the fake runs them too)."""
    name = "sampled_weight_grad"
    if grad_out.dim() != 2:
        raise ValueError(f"{name}: grad_out must be 2-D (T, m), got shape {tuple(grad_out.shape)}")
    if x.dim() != 2:
        raise ValueError(f"{name}: x must be 2-D (T, n), got shape {tuple(x.shape)}")
    if x.shape[0] != grad_out.shape[0]:
        raise ValueError(f"{name}: x and grad_out must have the same number of rows T, got x {tuple(x.shape)} "
                         f"and grad_out {tuple(grad_out.shape)}")
    for arg, t in (("grad_out", grad_out), ("x", x)):
        if not t.is_floating_point():
            raise ValueError(f"{name}: {arg} must be a floating tensor (fp32, bf16, fp16, fp64), got {t.dtype}")
    if idx.dtype != torch.int32 or idx.dim() != 1:
        raise ValueError(f"{name}: idx must be a 1-D int32 tensor of flat indices, got {idx.dtype} of shape "
                         f"{tuple(idx.shape)} (pass idx.to(torch.int32))")
    for arg, t in (("x", x), ("idx", idx)):
        if t.device != grad_out.device:
            raise ValueError(f"{name}: {arg} is on {t.device}, grad_out on {grad_out.device}; move it there")


def _sampled_weight_grad_reference(grad_out, x, idx):
    check_sampled_weight_grad_args(grad_out, x, idx)
    size = grad_out.shape[1] * x.shape[1]
    if idx.numel() and not (0 <= int(idx.min()) and int(idx.max()) < size):
        raise ValueError(f"sampled_weight_grad: idx must lie in [0, m*n) = [0, {size}), got values in "
                         f"[{int(idx.min())}, {int(idx.max())}]")
    return reference.sampled_weight_grad(grad_out, x, idx)


def _sampled_weight_grad_fake(grad_out, x, idx):
    check_sampled_weight_grad_args(grad_out, x, idx)
    return grad_out.new_empty(idx.shape, dtype=torch.float32)


_define("sampled_weight_grad(Tensor grad_out, Tensor x, Tensor idx) -> Tensor",
        _sampled_weight_grad_reference, _sampled_weight_grad_fake, _SAMPLED_WEIGHT_GRAD_DOC, differentiable=False)


# ----------------------------------------------------------------------------- principal_weights
# svd="exact" is always the reference's (the definition); svd="fast" may run a compiled kernel.
_PRINCIPAL_WEIGHTS_DOC = """LIFT's principal weights: the flat indices of the k entries of largest |W'|.

W' is the best rank-``lra_rank`` approximation of W (Eckart-Young; the paper's low-rank filter,
Section 3.2). On the fast path W' is never formed as an m x n matrix: its factors are, and a fused
top-k reads them.

Args:
    W: one matrix (m, n) or a batch of same-shaped matrices (b, m, n); fp32, bf16, fp16 or fp64
        (computed in fp32, fp64 for fp64).
    k: entries to select per matrix, 0 <= k <= m * n (LIFT's budget: min((m + n) * rank, m * n)).
    lra_rank: rank of the approximation, >= 1. From min(m, n) on, W' is W itself: the selection is
        then the k largest |W| (no sketch is drawn, whatever ``svd`` says).
    svd: "fast" (randomized block Krylov; agrees with "exact" on >= 0.99 of the entries of real LLM
        weights) or "exact" (full SVD, the definition).
    largest: False selects the k smallest |W'| instead (an ablation).
    generator: the random source of svd="fast" (same generator state, same selection); None draws
        from torch's default generator.

Returns:
    int32 flat indices (row * n + col) in ascending order, shape (k,) for one matrix or (b, k) for a
    batch, on W's device. Ties at the threshold go to the lowest index, so there are exactly k.

Raises ValueError when W's shape, k, lra_rank or svd is out of range.
"""


def check_principal_weights_args(W: Tensor, k: int, lra_rank: int, svd: str) -> None:
    if W.dim() not in (2, 3):
        raise ValueError(f"W must be (m, n) or (b, m, n), got shape {tuple(W.shape)}")
    m, n = W.shape[-2:]
    if not 0 <= k <= m * n:
        raise ValueError(f"k must be in [0, m*n] = [0, {m * n}], got {k}")
    if lra_rank < 1:
        raise ValueError(f"lra_rank must be >= 1, got {lra_rank}")
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
    if svd == "fast" and not full_rank(W.shape, lra_rank):  # as the compiled kernels do; the reference draws its sketch
        draw_seed(generator)
    return W.new_empty((*W.shape[:-2], k), dtype=torch.int32)


_define('principal_weights(Tensor W, int k, int lra_rank, str svd="fast", bool largest=True, '
        "Generator? generator=None) -> Tensor",
        _principal_weights_reference, _principal_weights_fake, _PRINCIPAL_WEIGHTS_DOC, differentiable=False)


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
        _principal_weights_seeded_reference, _principal_weights_seeded_fake, differentiable=False)


def _lowrank_reference(W, rank, seed, passes, oversample):
    L, R = fast_lowrank(W, rank, passes=passes, oversample=oversample, generator=_seeded(W, seed))
    return L.contiguous(), R.contiguous()  # the layout of the fake's (and the compiled kernels') factors


def _lowrank_fake(W, rank, seed, passes, oversample):
    b, m, n = W.shape
    dtype = work_dtype(W)
    return W.new_empty((b, m, rank), dtype=dtype), W.new_empty((b, rank, n), dtype=dtype)


_define("_lowrank(Tensor W, int rank, int seed, int passes, int oversample) -> (Tensor, Tensor)",
        _lowrank_reference, _lowrank_fake, differentiable=False)


def _topk_abs_product_reference(L, R, k, largest):
    return reference.topk_flat_indices((L @ R).abs_(), k, largest)


def _topk_abs_product_fake(L, R, k, largest):
    return L.new_empty((L.shape[0], k), dtype=torch.int32)


_define("_topk_abs_product(Tensor L, Tensor R, int k, bool largest) -> Tensor",
        _topk_abs_product_reference, _topk_abs_product_fake, differentiable=False)

PUBLIC = ("sparse_adamw_step", "sparse_adamw8bit_step", "remap_state", "principal_weights",
          "sampled_weight_grad")
