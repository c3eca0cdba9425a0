"""Every op passes torch.library.opcheck under every backend that runs here (the reference, the
C++ kernels of lift_kernels._C, Triton under TRITON_INTERPRET=1 on a CPU), on small odd-size inputs,
and a training run under each forced backend follows the reference's."""
from __future__ import annotations

import pytest
import torch

from lift_kernels import ops
from lift_kernels.ops import library, use_backend
from lift_kernels.ops.backends import BACKENDS, BackendUnavailableError, implements
from lift_kernels.reference.moment_codes import EXP_AVG_BOOK, EXP_AVG_SQ_BOOK, quantize_blockwise
from helpers import TinyMLP, backend_trajectory

lk_ops = torch.ops.lift_kernels
HP = dict(step=3, lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
# The Triton kernels run in the interpreter here: the schema and fake checks, not torch.compile's.
FAST_UTILS = ("test_schema", "test_faketensor")


def _step_case(dtype, masters: bool, gathered: bool):
    g = torch.Generator().manual_seed(0)
    params, grads, idxs, ms, vs, mas = [], [], [], [], [], []
    for (m, n), k in (((13, 7), 31), ((5, 3), 1), ((4, 4), 0)):
        p = torch.randn(m, n, generator=g).to(dtype)
        idx = torch.randperm(m * n, generator=g)[:k].sort().values.to(torch.int32)
        params.append(p)
        grads.append(torch.randn(k if gathered else (m, n), generator=g).to(dtype))
        idxs.append(idx)
        ms.append(torch.randn(k, generator=g))
        vs.append(torch.rand(k, generator=g))
        mas.append(p.view(-1)[idx.long()].float() if masters else None)
    return (params, grads, idxs, ms, vs, mas if masters else None), HP


def _step8bit_case(dtype, masters: bool, gathered: bool):
    """Moments as codes and block scales; 301 entries span two blocks of 256."""
    (params, grads, idxs, ms, vs, mas), hp = _step_case(dtype, masters, gathered)
    g = torch.Generator().manual_seed(4)
    p = torch.randn(31, 17, generator=g).to(dtype)
    idx = torch.randperm(31 * 17, generator=g)[:301].sort().values.to(torch.int32)
    params, idxs = params + [p], idxs + [idx]
    grads = grads + [torch.randn(301 if gathered else (31, 17), generator=g).to(dtype)]
    ms, vs = ms + [torch.randn(301, generator=g)], vs + [torch.rand(301, generator=g)]
    if masters:
        mas = mas + [p.view(-1)[idx.long()].float()]
    m_q = [quantize_blockwise(m, EXP_AVG_BOOK) for m in ms]
    v_q = [quantize_blockwise(v, EXP_AVG_SQ_BOOK) for v in vs]
    args = (params, grads, idxs, [c for c, _ in m_q], [s for _, s in m_q], [c for c, _ in v_q], [s for _, s in v_q],
            mas if masters else None)
    return args, {**hp, "exp_avg_book": EXP_AVG_BOOK, "exp_avg_sq_book": EXP_AVG_SQ_BOOK}


def _remap_case(dtype):
    old = torch.tensor([1, 4, 6, 9, 20, 33, 40], dtype=torch.int32)
    new = torch.tensor([0, 4, 9, 21, 33], dtype=torch.int32)
    return (old, new, [torch.randn(7).to(dtype), torch.rand(7)]), {}


def _sampled_grad_case(dtype, k):
    g = torch.Generator().manual_seed(3)
    idx = torch.randperm(13 * 7, generator=g)[:k].to(torch.int32)  # any order
    return (torch.randn(5, 13, generator=g).to(dtype), torch.randn(5, 7, generator=g).to(dtype), idx), {}


def _w(dtype, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype)


# (op, id, args and kwargs, which opcheck utils: None = all)
SAMPLES = [
    *[("sparse_adamw_step", f"{name}_masters{m}_gathered{gathered}", _step_case(dt, m, gathered), None)
      for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)) for m in (False, True)
      for gathered in (False, True) if dt == torch.bfloat16 or not m],
    *[("sparse_adamw8bit_step", f"{name}_masters{m}_gathered{gathered}", _step8bit_case(dt, m, gathered), None)
      for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)) for m in (False, True)
      for gathered in (False, True) if dt == torch.bfloat16 or not m],
    ("remap_state", "fp32", _remap_case(torch.float32), None),
    ("remap_state", "bf16", _remap_case(torch.bfloat16), None),
    ("sampled_weight_grad", "fp32", _sampled_grad_case(torch.float32, 31), None),
    ("sampled_weight_grad", "bf16", _sampled_grad_case(torch.bfloat16, 31), None),
    ("sampled_weight_grad", "fp32_empty", _sampled_grad_case(torch.float32, 0), None),
    ("principal_weights", "exact_fp32", ((_w(torch.float32, 23, 17), 40, 3), {"svd": "exact"}), None),
    ("principal_weights", "exact_bf16_batch_smallest",
     ((_w(torch.bfloat16, 2, 9, 13), 11, 2), {"svd": "exact", "largest": False}), None),
    # svd="fast" draws its seed from the generator: each run differs, so no comparison of two runs
    ("principal_weights", "fast_fp32", ((_w(torch.float32, 23, 17), 40, 3),
                                        {"generator": torch.Generator().manual_seed(2)}), FAST_UTILS),
    ("_principal_weights_seeded", "fp32", ((_w(torch.float32, 2, 23, 17), 40, 3, True, 5), {}), None),
    ("_principal_weights_seeded", "bf16", ((_w(torch.bfloat16, 1, 9, 13), 0, 2, False, 5), {}), None),
    ("_lowrank", "fp32", ((_w(torch.float32, 2, 41, 29), 3, 5, 4, 2), {}), None),
    ("_topk_abs_product", "fp32", ((_w(torch.float32, 2, 13, 3), _w(torch.float32, 2, 3, 11), 17, True), {}), None),
]


def test_every_op_has_samples():
    assert {op for op, *_ in SAMPLES} == set(library.OPS)


@pytest.mark.parametrize("backend, op, sample, utils", [
    (backend, op, (args, kwargs), FAST_UTILS if backend == "triton" else utils)
    for backend in BACKENDS for op, _, (args, kwargs), utils in SAMPLES if implements(backend, op)],
    ids=[f"{backend}-{op}-{name}" for backend in BACKENDS for op, name, *_ in SAMPLES if implements(backend, op)])
def test_opcheck(backend, op, sample, utils):
    with use_backend(backend):
        chosen, why = ops.chosen(op, "cpu")
        if chosen == "error":
            pytest.skip(why)
        assert chosen == backend, why
        args, kwargs = sample
        torch.library.opcheck(getattr(lk_ops, op).default, args, kwargs,
                              **({} if utils is None else {"test_utils": utils}))


@pytest.mark.parametrize("forced", ["native", "triton"])
def test_training_under_each_forced_backend_follows_the_reference(forced):
    """Seven steps (refreshes at 3 and 6) under LIFT_BACKEND=forced against the reference's."""
    with use_backend(forced):
        if ops.chosen("sparse_adamw_step", "cpu")[0] == "error":
            pytest.skip(ops.chosen("sparse_adamw_step", "cpu")[1])
    model = TinyMLP()
    got = backend_trajectory(model, forced, steps=7)
    want = backend_trajectory(model, "reference", steps=7)
    for step, (g, w) in enumerate(zip(got, want), start=1):
        for a, b in zip(g, w):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m: f"step {step}: {m}")
    assert not torch.equal(got[-1][0], got[0][0])


def test_a_forced_backend_that_cannot_run_fails_the_training_step(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match=r"use_backend\('triton'\) was forced but cannot run"):
        backend_trajectory(TinyMLP(), "triton", steps=1)
