"""ops.sampled_weight_grad (the SDDMM of LIFT over a quantized base) against the dense weight
gradient (grad_out.T @ x).flatten()[idx]: odd sizes, fp32/bf16/fp16, any index order, empty cases,
chunking, and bad inputs refused with the argument named."""
from __future__ import annotations

import pytest
import torch

import lift_kernels as lk
from lift_kernels.reference import sampled_grad

op = lk.ops.sampled_weight_grad


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


@pytest.mark.parametrize("args, match", [
    (lambda g, x, i: (g[0], x, i), "grad_out must be 2-D"),
    (lambda g, x, i: (g, x[None], i), "x must be 2-D"),
    (lambda g, x, i: (g, x[:3], i), "x and grad_out must have the same number of rows"),
    (lambda g, x, i: (g, x.to(torch.int32), i), "x must be a floating tensor"),
    (lambda g, x, i: (g.to(torch.int64), x, i), "grad_out must be a floating tensor"),
    (lambda g, x, i: (g, x, i.long()), r"idx must be a 1-D int32 tensor .*pass idx.to\(torch.int32\)"),
    (lambda g, x, i: (g, x, i[None]), "idx must be a 1-D int32 tensor"),
    (lambda g, x, i: (g, x, torch.tensor([0, 20], dtype=torch.int32)), r"idx must lie in \[0, m\*n\) = \[0, 20\)"),
    (lambda g, x, i: (g, x, torch.tensor([-1], dtype=torch.int32)), r"idx must lie in .* got values in \[-1, -1\]"),
])
def test_bad_inputs_are_refused_naming_the_argument(args, match):
    grad_out, x, idx = _case(5, 4, 5, 6, torch.float32)
    with pytest.raises(ValueError, match=match):
        op(*args(grad_out, x, idx))


def test_its_help_says_what_it_computes():
    doc = lk.ops.sampled_weight_grad.__doc__
    for phrase in ("(T, m)", "(T, n)", "int32", "fp32", "idx[j] // n"):
        assert phrase in doc, phrase
