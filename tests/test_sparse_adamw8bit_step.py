"""The kernels of sparse_adamw8bit_step (C++ on CPU, Triton under TRITON_INTERPRET=1) against the
reference op, one step at a time from the same state.

What may differ, and why:
- weights: the AdamW arithmetic is the fp32-moment step's, so they differ as that step's kernels
  do (tests/test_sparse_adamw_step.py): the sqrt of torch's CPU kernels is off by an ulp for some
  inputs, so an fp32 weight differs by about 1e-6 of its update plus one rounding of the weight;
  a bf16/fp16 weight's error against fp64 is at most twice the reference's in the same dtype.
- moments: lerp and addcmul involve no sqrt. The C++ kernel rounds them exactly as torch does, and
  r = value / scale is one IEEE division in both, so its scales and codes are bit-identical. A
  Triton kernel may round a multiply-add differently (fused or not) by an ulp: a scale may then
  differ by an ulp, and a code by one where r lies within a few ulps of the midpoint between the
  two codes, and nowhere else.
- test_codes_round_to_the_nearest_book_value_of_their_own_block plants values on, just above and
  just below midpoints in blocks of different scales, where every kernel must agree exactly.
"""
from __future__ import annotations

import pytest
import torch

from lift_kernels import reference
from lift_kernels.ops import native
from lift_kernels.reference.moment_codes import (EXP_AVG_BOOK, EXP_AVG_SQ_BOOK, QBLOCK, dequantize_blockwise,
                                                 midpoints, quantize_blockwise)
from lift_kernels.reference.sparse_adamw import adamw_selected, step_constants

# (shape, k): odd sizes, blocks of one entry, exactly one block, one block and one entry, k = 0
SHAPES = [((123, 77), 2000), ((5, 7), 1), ((40, 40), 0), ((16, 16), 255), ((17, 16), 256), ((19, 16), 257),
          ((64, 100), 1031)]
CALLS = [(1, 1e-2), (2, 3e-3), (9, 2e-2)]  # (step, lr) of consecutive calls
HP = dict(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
BOOKS = dict(exp_avg_book=EXP_AVG_BOOK, exp_avg_sq_book=EXP_AVG_SQ_BOOK)
STATE = ("params", "m_codes", "m_scales", "v_codes", "v_scales", "masters")


def _triton_step():
    from lift_kernels._triton_loader import load_kernel_module
    try:
        return load_kernel_module("sparse_adamw8bit_step").sparse_adamw8bit_step
    except (ImportError, FileNotFoundError, ModuleNotFoundError):
        return None


STEPS = {"reference": reference.sparse_adamw8bit_step,
         "native": native.kernel("sparse_adamw8bit_step", "cpu"),
         "triton": _triton_step()}
EXACT_MOMENTS = {"reference": True, "native": True, "triton": False}


def _step_fn(backend):
    fn = STEPS[backend]
    if fn is None:
        pytest.skip(f"no {backend} kernel of sparse_adamw8bit_step here")
    return fn


def _case(dtype, masters: bool, shapes=SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    case = {key: [] for key in STATE + ("idxs",)}
    for shape, k in shapes:
        p = torch.randn(shape, generator=g).to(dtype)
        idx = torch.randperm(p.numel(), generator=g)[:k].sort().values.to(torch.int32)
        mc, ms = quantize_blockwise(0.01 * torch.randn(k, generator=g), EXP_AVG_BOOK)
        vc, vs = quantize_blockwise(1e-4 * torch.rand(k, generator=g), EXP_AVG_SQ_BOOK)
        for key, t in zip(STATE + ("idxs",), (p, mc, ms, vc, vs, p.view(-1)[idx.long()].float() if masters else None,
                                              idx)):
            case[key].append(t)
    case["has_masters"] = masters
    return case


def _grads(case, dtype, gathered, seed):
    g = torch.Generator().manual_seed(seed)
    dense = [torch.randn(p.shape, generator=g).to(dtype) for p in case["params"]]
    return [d.view(-1)[i.long()].clone() for d, i in zip(dense, case["idxs"])] if gathered else dense


def _clone(case):
    out = {key: [None if t is None else t.clone() for t in case[key]] for key in STATE + ("idxs",)}
    out["has_masters"] = case["has_masters"]
    return out


def _run(fn, case, grads, step, lr, hp=HP):
    out = _clone(case)
    fn(out["params"], grads, out["idxs"], out["m_codes"], out["m_scales"], out["v_codes"], out["v_scales"],
       out["masters"] if out["has_masters"] else None, **BOOKS, step=step, lr=lr, **hp)
    return out


def _new_moments(case, grads, step, lr, hp=HP):
    """The reference's new moments before rounding, fp32 (k,) per weight: m, v."""
    consts = step_constants(step, lr, **hp)
    out = []
    for p, g, idx, mc, ms, vc, vs, w in zip(*(case[key] for key in ("params",)), grads, case["idxs"],
                                            case["m_codes"], case["m_scales"], case["v_codes"], case["v_scales"],
                                            case["masters"]):
        m, v = dequantize_blockwise(mc, ms, EXP_AVG_BOOK), dequantize_blockwise(vc, vs, EXP_AVG_SQ_BOOK)
        if idx.numel():
            adamw_selected(p.clone(), g, idx, m, v, None if w is None else w.clone(), consts)
        out.append((m, v))
    return out


def _fp64_weights(case, grads, step, lr, hp=HP):
    """The new selected weights with all arithmetic in fp64 from the same codes (the accuracy oracle)."""
    b1, b2 = hp["beta1"], hp["beta2"]
    out = []
    for p, g, idx, mc, ms, vc, vs, w in zip(case["params"], grads, case["idxs"], case["m_codes"], case["m_scales"],
                                            case["v_codes"], case["v_scales"], case["masters"]):
        i = idx.long()
        g = (g.reshape(-1)[i] if g.shape == p.shape else g).double()
        w = (w if w is not None else p.view(-1)[i]).double() * (1 - lr * hp["weight_decay"])
        m = b1 * dequantize_blockwise(mc, ms, EXP_AVG_BOOK.double()) + (1 - b1) * g
        v = b2 * dequantize_blockwise(vc, vs, EXP_AVG_SQ_BOOK.double()) + (1 - b2) * g * g
        out.append(w - lr / (1 - b1**step) * m / (v.sqrt() / (1 - b2**step) ** 0.5 + hp["eps"]))
    return out


def _selected(state, i):
    w = state["masters"][i]
    return w if w is not None else state["params"][i].view(-1)[state["idxs"][i].long()]


def _assert_codes_agree(got_codes, want_codes, want_scales, new_values, book, exact):
    if exact:
        assert torch.equal(got_codes, want_codes)
        return
    diff = got_codes.int() - want_codes.int()
    off = diff != 0
    assert bool((diff.abs() <= 1).all()), "a code differs by more than one"
    if not bool(off.any()):
        return
    # r of the reference, and the midpoint between the two codes: within a few ulps of each other
    scale = want_scales.repeat_interleave(QBLOCK)[:new_values.numel()]
    r = (new_values / torch.where(scale > 0, scale, torch.ones_like(scale))).clamp(-1, 1)[off]
    lower = torch.minimum(got_codes, want_codes)[off].long()
    mid = midpoints(book)[lower]
    assert bool(((r - mid).abs() <= 4 * torch.finfo(torch.float32).eps * mid.abs().clamp(min=1e-30)).all()), \
        "a code differs where r is not at a midpoint"


def _assert_step_agrees(backend, case, grads, step, lr, dtype):
    got = _run(_step_fn(backend), case, grads, step, lr)
    want = _run(reference.sparse_adamw8bit_step, case, grads, step, lr)
    exact = EXACT_MOMENTS[backend]
    oracle = _fp64_weights(case, grads, step, lr)
    for i in range(len(case["params"])):
        if case["idxs"][i].numel() == 0:
            assert torch.equal(got["params"][i], case["params"][i])
            continue
        gw, ww, ow = _selected(got, i), _selected(want, i), oracle[i]
        if gw.dtype == torch.float32:  # the update to ~1e-6, plus one rounding of the weight
            update = (ww.double() - _selected(case, i).double()).abs()
            tol = 1e-6 * update + torch.finfo(torch.float32).eps * ww.double().abs()
            assert bool(((gw.double() - ww.double()).abs() <= tol).all()), (backend, i)
        else:
            err_got = (gw.double() - ow).abs().max().item()
            err_torch = (ww.double() - ow).abs().max().item()
            assert err_got <= 2 * err_torch + 1e-6 * ow.abs().max().item(), (backend, i, err_got, err_torch)
        if case["has_masters"]:  # the rounded weight follows its master
            assert torch.equal(got["params"][i].view(-1)[case["idxs"][i].long()], got["masters"][i].to(dtype))
        new = _new_moments(case, grads, step, lr)[i]
        for codes, scales, value, book in (("m_codes", "m_scales", new[0], EXP_AVG_BOOK),
                                           ("v_codes", "v_scales", new[1], EXP_AVG_SQ_BOOK)):
            if exact:
                assert torch.equal(got[scales][i], want[scales][i]), (backend, i, scales)
            else:
                torch.testing.assert_close(got[scales][i], want[scales][i], rtol=2.5e-7, atol=0)
            _assert_codes_agree(got[codes][i], want[codes][i], want[scales][i], value, book, exact)
    return want


BACKENDS = ["reference", "native", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masters", [False, True], ids=["no_master", "master"])
@pytest.mark.parametrize("gathered", [False, True], ids=["dense_grad", "gathered_grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_matches_reference_step_by_step(dtype, gathered, masters, backend):
    """Several weights in one bucket, three calls: each compared from the reference's state."""
    if masters and dtype == torch.float32:
        pytest.skip("fp32 weights need no master copy")
    _step_fn(backend)
    case = _case(dtype, masters)
    for n, (step, lr) in enumerate(CALLS):
        case = _assert_step_agrees(backend, case, _grads(case, dtype, gathered, seed=10 + n), step, lr, dtype)


def _planted_case(book):
    """beta1 = 0 makes the new exp_avg the fp32 gradient itself, so r is known exactly: three blocks of
    scales 1, 4 and 0.5 (powers of two: value / scale is exact), holding every midpoint, its next fp32
    up and its next fp32 down, and one entry at +scale."""
    mid = midpoints(book)
    r = torch.stack([mid, torch.nextafter(mid, torch.tensor(2.0)), torch.nextafter(mid, torch.tensor(-2.0))],
                    1).reshape(-1).clamp(-1, 1)
    blocks = []
    for scale in (1.0, 4.0, 0.5):
        for start in range(0, r.numel(), QBLOCK - 1):
            blocks.append(torch.cat([r[start:start + QBLOCK - 1], torch.ones(1)]) * scale)
    values = torch.cat(blocks)
    expected = torch.cat([(mid[None, :] < b[:, None] / b.abs().max()).sum(1) for b in blocks]).to(torch.uint8)
    return values, expected, torch.stack([b.abs().max() for b in blocks])


@pytest.mark.parametrize("backend", BACKENDS)
def test_codes_round_to_the_nearest_book_value_of_their_own_block(backend):
    """Fails for a kernel that rounds r to the wrong neighbor (ties go to the lower code), reads another
    block's scale, or computes the midpoints or r in another precision."""
    fn = _step_fn(backend)
    g, expected, scales = _planted_case(EXP_AVG_BOOK)
    assert bool((g.view(-1, 1) != 0).any())
    k = g.numel()
    p = torch.zeros(k + 5)
    idx = torch.arange(k, dtype=torch.int32) + 3
    mc = torch.zeros(k, dtype=torch.uint8)
    vc = torch.zeros(k, dtype=torch.uint8)
    ms, vs = torch.zeros_like(scales), torch.zeros_like(scales)
    fn([p], [g], [idx], [mc], [ms], [vc], [vs], None, **BOOKS, step=1, lr=1e-3,
       beta1=0.0, beta2=0.5, eps=1e-8, weight_decay=0.0)
    assert torch.equal(ms, scales)
    assert torch.equal(mc, expected), (mc.int() - expected.int()).nonzero()[:5]
    want_vc, want_vs = quantize_blockwise(0.5 * g * g, EXP_AVG_SQ_BOOK)
    assert torch.equal(vs, want_vs) and torch.equal(vc, want_vc)


def test_planted_case_is_the_reference_rule():
    g, expected, scales = _planted_case(EXP_AVG_BOOK)
    codes, got_scales = quantize_blockwise(g, EXP_AVG_BOOK)
    assert torch.equal(codes, expected) and torch.equal(got_scales, scales)


def _bad_args():
    case = _case(torch.float32, False, SHAPES[:1])
    grads = _grads(case, torch.float32, False, 1)
    return [case["params"], grads, case["idxs"], case["m_codes"], case["m_scales"], case["v_codes"], case["v_scales"],
            None], dict(**BOOKS, step=1, lr=1e-3, **HP)


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("arg,bad,match", [
    (3, lambda c: [x.int() for x in c], "exp_avg_codes"),
    (5, lambda c: [x[:-1] for x in c], "exp_avg_sq_codes"),
    (4, lambda s: [x.double() for x in s], "exp_avg_scales"),
    (6, lambda s: [x[:-1] for x in s], "exp_avg_sq_scales"),
    ("exp_avg_book", lambda b: b.flip(0), "exp_avg_book"),
    ("exp_avg_sq_book", lambda b: b[:255], "exp_avg_sq_book"),
    ("exp_avg_book", lambda b: b.double(), "exp_avg_book"),
])
def test_bad_inputs_raise_errors_naming_the_argument(backend, arg, bad, match):
    fn = _step_fn(backend)
    args, kwargs = _bad_args()
    if isinstance(arg, int):
        args[arg] = bad(args[arg])
    else:
        kwargs[arg] = bad(kwargs[arg])
    with pytest.raises((ValueError, RuntimeError), match=match):
        fn(*args, **kwargs)


@pytest.mark.skipif(STEPS["native"] is None, reason="no C++ kernel")
def test_native_many_weights_two_threads_match_one_thread():
    shapes = [((m, n), (m * n) // 3) for m, n in [(301, 257), (3, 5), (517, 263), (1, 1)]]
    case = _case(torch.bfloat16, True, shapes, seed=5)
    grads = _grads(case, torch.bfloat16, False, 6)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(_run(STEPS["native"], case, grads, 3, 1e-3))
    finally:
        torch.set_num_threads(threads)
    for key in STATE:
        for a, b in zip(results[0][key], results[1][key]):
            assert torch.equal(a, b), key
