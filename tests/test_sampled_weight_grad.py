"""ops.sampled_weight_grad (the SDDMM of LIFT over a quantized base) against the dense weight
gradient (grad_out.T @ x).flatten()[idx]: odd sizes, fp32/bf16/fp16/fp64, any index order, empty
cases, chunking, and bad inputs refused with the argument named; on every backend that runs here
(the reference, the C++ kernel of lift_kernels._C, Triton: under TRITON_INTERPRET=1 on the CPU)."""
from __future__ import annotations

import pytest
import torch

import lift_kernels as lk
from lift_kernels.ops import backends, use_backend
from lift_kernels.reference import sampled_grad

op = lk.ops.sampled_weight_grad
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [b for b in backends.BACKENDS if backends._why_not("sampled_weight_grad", b, DEVICE) is None
            and backends.implements(b, "sampled_weight_grad")]


def _case(T, m, n, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(T, m, generator=g).to(dtype)
    x = torch.randn(T, n, generator=g).to(dtype)
    idx = torch.randint(0, m * n, (k,), generator=g, dtype=torch.int64).to(torch.int32)  # any order, repeats
    return grad_out, x, idx


def _dense(grad_out, x, idx, dtype=torch.float64):
    return (grad_out.to(dtype).T @ x.to(dtype)).flatten()[idx.long()]


SIZES = [(1, 1, 1, 1), (7, 13, 5, 40), (33, 123, 97, 4097), (2, 3, 4097, 123)]


@pytest.mark.parametrize("T, m, n, k", SIZES)
def test_fp32_matches_the_dense_gradient(T, m, n, k):
    grad_out, x, idx = _case(T, m, n, k, torch.float32)
    got = op(grad_out, x, idx)
    assert got.dtype == torch.float32 and got.shape == (k,)
    torch.testing.assert_close(got.double(), _dense(grad_out, x, idx), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T, m, n, k", SIZES[1:])
def test_low_precision_error_is_at_most_twice_torchs(dtype, T, m, n, k):
    """Accumulated in fp32: no worse than twice the error of the same product done in torch in ``dtype``."""
    grad_out, x, idx = _case(T, m, n, k, dtype, seed=1)
    exact = _dense(grad_out, x, idx)
    got = op(grad_out, x, idx)
    assert got.dtype == torch.float32
    ours = (got.double() - exact).abs().max().item()
    torchs = (_dense(grad_out, x, idx, dtype).double() - exact).abs().max().item()
    assert ours <= 2 * torchs + 1e-6, (ours, torchs)


def test_mixed_input_dtypes():
    grad_out, x, idx = _case(9, 11, 7, 30, torch.float32, seed=2)
    got = op(grad_out.bfloat16(), x, idx)
    torch.testing.assert_close(got.double(), _dense(grad_out.bfloat16(), x, idx), rtol=1e-5, atol=1e-5)


def test_chunks_give_the_unchunked_values(monkeypatch):
    grad_out, x, idx = _case(17, 29, 31, 500, torch.float32, seed=3)
    whole = op(grad_out, x, idx)
    monkeypatch.setattr(sampled_grad, "CHUNK_ELEMENTS", 64)  # 3 indices per chunk, the last one short
    # the sum over T may vectorize differently for another chunk width: equal to rounding
    torch.testing.assert_close(op(grad_out, x, idx), whole, rtol=1e-6, atol=1e-6)


def test_empty_idx_and_no_rows():
    grad_out, x, _ = _case(5, 4, 3, 0, torch.float32)
    empty = op(grad_out, x, torch.zeros(0, dtype=torch.int32))
    assert empty.shape == (0,) and empty.dtype == torch.float32
    none = op(torch.zeros(0, 4), torch.zeros(0, 3), torch.tensor([0, 11], dtype=torch.int32))
    assert none.tolist() == [0.0, 0.0]


BAD_INPUTS = [
    (lambda g, x, i: (g[0], x, i), "grad_out must be 2-D"),
    (lambda g, x, i: (g, x[None], i), "x must be 2-D"),
    (lambda g, x, i: (g, x[:3], i), "x and grad_out must have the same number of rows"),
    (lambda g, x, i: (g, x.to(torch.int32), i), "x must be a floating tensor"),
    (lambda g, x, i: (g.to(torch.int64), x, i), "grad_out must be a floating tensor"),
    (lambda g, x, i: (g, x, i.long()), r"idx must be a 1-D int32 tensor .*pass idx.to\(torch.int32\)"),
    (lambda g, x, i: (g, x, i[None]), "idx must be a 1-D int32 tensor"),
    (lambda g, x, i: (g, x, i.new_tensor([0, 20])), r"idx must lie in \[0, m\*n\) = \[0, 20\)"),
    (lambda g, x, i: (g, x, i.new_tensor([-1])), r"idx must lie in .* got values in \[-1, -1\]"),
]


@pytest.mark.parametrize("args, match", BAD_INPUTS)
def test_bad_inputs_are_refused_naming_the_argument(args, match):
    grad_out, x, idx = _case(5, 4, 5, 6, torch.float32)
    with pytest.raises(ValueError, match=match):
        op(*args(grad_out, x, idx))


def test_its_help_says_what_it_computes():
    doc = lk.ops.sampled_weight_grad.__doc__
    for phrase in ("(T, m)", "(T, n)", "int32", "fp32", "idx[j] // n"):
        assert phrase in doc, phrase


# ------------------------------------------------------------------ every backend against the reference
def _inputs(T, m, n, k, dtype, seed, order="random"):
    """Fresh random inputs on DEVICE; ``order``: "random" (repeats, any order), "sorted" (LIFT's:
    distinct, ascending, so rows come in runs) or "rows" (a few rows, each many times, shuffled)."""
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(T, m, generator=g).to(dtype)
    x = torch.randn(T, n, generator=g).to(dtype)
    if order == "sorted":
        idx = torch.randperm(m * n, generator=g)[:k].sort().values
    elif order == "rows":
        rows = torch.randint(0, m, (3,), generator=g)
        idx = rows[torch.randint(0, 3, (k,), generator=g)] * n + torch.randint(0, n, (k,), generator=g)
    else:
        idx = torch.randint(0, m * n, (k,), generator=g)
    return grad_out.to(DEVICE), x.to(DEVICE), idx.to(torch.int32).to(DEVICE)


def _scale(grad_out, x, idx):
    """Per entry, sum_t |grad_out[t, row] * x[t, col]|: what a sum's rounding error is relative to."""
    return _dense(grad_out.abs(), x.abs(), idx)


def _run(backend, grad_out, x, idx):
    with use_backend(backend):
        return op(grad_out, x, idx)


ODD = [(1, 5, 3, 1), (7, 13, 5, 40), (129, 31, 17, 300), (129, 3, 257, 1001), (33, 123, 97, 4097),
       (7, 1, 1, 9)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", ["random", "sorted", "rows"])
@pytest.mark.parametrize("T, m, n, k", ODD)
def test_backend_fp32_is_the_reference_within_rounding(backend, order, T, m, n, k):
    k = min(k, m * n) if order == "sorted" else k
    grad_out, x, idx = _inputs(T, m, n, k, torch.float32, seed=T * 7 + k, order=order)
    got, want = _run(backend, grad_out, x, idx), _run("reference", grad_out, x, idx)
    assert got.dtype == torch.float32 and got.shape == (k,) and got.device == grad_out.device
    exact, scale = _dense(grad_out, x, idx), _scale(grad_out, x, idx)
    assert ((got.double() - exact).abs() <= 1e-6 * scale).all()
    assert ((got.double() - want.double()).abs() <= 1e-6 * scale).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T, m, n, k", ODD[1:])
def test_backend_low_precision_error_is_at_most_twice_torchs(backend, dtype, T, m, n, k):
    grad_out, x, idx = _inputs(T, m, n, k, dtype, seed=k, order="sorted" if k <= m * n else "random")
    exact = _dense(grad_out, x, idx)
    ours = (_run(backend, grad_out, x, idx).double() - exact).abs().max().item()
    torchs = (_dense(grad_out, x, idx, dtype).double() - exact).abs().max().item()
    assert ours <= 2 * torchs + 1e-6, (ours, torchs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_fp64_and_mixed_inputs_are_rounded_to_fp32_as_the_reference(backend):
    grad_out, x, idx = _inputs(129, 19, 23, 200, torch.float64, seed=5)
    for g, xx in [(grad_out, x), (grad_out.bfloat16(), x), (grad_out, x.half()), (grad_out.float(), x)]:
        got, want = _run(backend, g, xx, idx), _run("reference", g, xx, idx)
        assert got.dtype == torch.float32
        assert ((got.double() - want.double()).abs() <= 1e-6 * _scale(g.float(), xx.float(), idx)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_non_contiguous_inputs(backend):
    grad_out, x, idx = _inputs(9, 14, 22, 50, torch.float32, seed=6)
    g2, x2 = grad_out.T.contiguous().T, x[:, ::2]  # column-major grad_out, strided x
    i2 = (idx % (14 * 11))
    got = _run(backend, g2, x2, i2)
    assert ((got.double() - _dense(g2, x2, i2)).abs() <= 1e-6 * _scale(g2, x2, i2)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_empty_idx_and_no_rows(backend):
    empty = _run(backend, torch.randn(5, 4, device=DEVICE), torch.randn(5, 3, device=DEVICE),
                 torch.zeros(0, dtype=torch.int32, device=DEVICE))
    assert empty.shape == (0,) and empty.dtype == torch.float32
    none = _run(backend, torch.zeros(0, 4, device=DEVICE), torch.zeros(0, 3, device=DEVICE),
                torch.tensor([0, 11], dtype=torch.int32, device=DEVICE))
    assert none.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("args, match", BAD_INPUTS)
def test_backend_refuses_bad_inputs_as_the_reference(backend, args, match):
    grad_out, x, idx = _inputs(5, 4, 5, 6, torch.float32, seed=0)
    with pytest.raises(ValueError, match=match):
        _run(backend, *args(grad_out, x, idx))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_backend_passes_opcheck(backend):
    grad_out, x, idx = _inputs(7, 13, 5, 40, torch.float32, seed=8)
    with use_backend(backend):
        torch.library.opcheck(torch.ops.lift_kernels.sampled_weight_grad.default, (grad_out, x, idx),
                              test_utils=("test_schema", "test_faketensor"))
