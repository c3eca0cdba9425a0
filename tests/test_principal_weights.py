"""The native principal_weights op (C++ on CPU, CUDA on a GPU) against the pure-torch reference.

The op is two steps, each exposed as a hook: ``_lowrank`` (block Krylov factors L, R) and
``_topk_abs_product`` (the fused top-k of |L R|, never forming L R). Each is checked on its own:
the factors against lift_kernels.reference.fast_lowrank (same algorithm, same random start), the
selection against torch.topk on the materialised product (exactly, on integer factors where every
product is exact; up to the rounding of an r-term dot product on float factors).
"""
from __future__ import annotations

import pytest
import torch

import lift_kernels as lk
from lift_kernels import _ext
from lift_kernels.ops import native
from lift_kernels.reference import exact_lowrank, fast_lowrank, topk_flat_indices
from lift_kernels.reference.lowrank import DEFAULT_OVERSAMPLE, DEFAULT_PASSES

pytestmark = pytest.mark.skipif(_ext.EXT is None, reason=f"native extension not built: {_ext.EXT_ERROR}")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and native.kernel("principal_weights", "cuda")
                     else [])
ops = torch.ops.lift_kernels


def _tf32_products(device, dtype) -> bool:
    """Whether the op's products with W run in TF32 here (fp32 or half weights on CUDA; see lowrank.cpp)."""
    return device != "cpu" and dtype != torch.float64


def _agreement_floor(device, dtype) -> float:
    # Two computations of one selection differ only at entries within rounding of the threshold:
    # about 1e-3 of them when W's products carry TF32's 2^-11 relative error, far fewer in fp32.
    return 0.995 if _tf32_products(device, dtype) else 0.999


def _integer_factors(b, m, n, r, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = torch.randint(-3, 4, (b, m, r), generator=g).to(dtype)
    R = torch.randint(-3, 4, (b, r, n), generator=g).to(dtype)
    return L.to(device), R.to(device)


def _low_rank_plus_noise(b, m, n, r, seed):
    g = torch.Generator().manual_seed(seed)
    signal = torch.randn(b, m, r, generator=g) @ torch.randn(b, r, n, generator=g)
    return signal + 0.05 * torch.randn(b, m, n, generator=g)


def _assert_is_selection(idx, b, k, m, n):
    assert idx.dtype == torch.int32 and idx.shape == (b, k)
    if k:
        assert torch.all(idx[:, 1:] > idx[:, :-1]), "indices must be sorted and distinct"
        assert idx.min() >= 0 and idx.max() < m * n


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b,m,n,r", [(1, 123, 77, 5), (2, 4097, 3, 2), (3, 1, 129, 1), (1, 65, 200, 0)])
@pytest.mark.parametrize("largest", [True, False])
def test_fused_selection_equals_topk_of_the_product_exactly(device, dtype, b, m, n, r, largest):
    # Small integer factors: every entry of L R is exact whatever the summation order, and many
    # entries tie, so this checks exact k and the tie rule (lowest flat index first) too.
    L, R = _integer_factors(b, m, n, r, device, dtype)
    scores = (L.cpu().double() @ R.cpu().double()).abs()
    for k in sorted({0, 1, 17 % (m * n), (m * n) // 3, m * n - 1, m * n}):
        got = ops._topk_abs_product(L, R, k, largest)
        _assert_is_selection(got, b, k, m, n)
        assert torch.equal(got.cpu(), topk_flat_indices(scores, k, largest)), f"k={k}"


def _dot_rounding_bound(L, R):
    """Per entry, a bound on |fl(L R) - L R| for r-term dot products in L's dtype (Higham's gamma_r)."""
    r = L.shape[-1]
    u = torch.finfo(L.dtype).eps / 2
    return (L.abs().double() @ R.abs().double()) * (r * u / (1 - r * u))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("largest", [True, False])
def test_fused_selection_of_float_factors_is_a_top_k_up_to_rounding(device, largest):
    g = torch.Generator().manual_seed(1)
    L, R = torch.randn(2, 300, 24, generator=g), torch.randn(2, 24, 411, generator=g)
    k = 3000
    idx = ops._topk_abs_product(L.to(device), R.to(device), k, largest).cpu()
    _assert_is_selection(idx, 2, k, 300, 411)
    exact = (L.double() @ R.double()).abs().flatten(1)
    slack = _dot_rounding_bound(L, R).flatten(1)
    sign = 1 if largest else -1
    for i in range(2):
        chosen = torch.zeros_like(exact[i], dtype=torch.bool)
        chosen[idx[i].long()] = True
        # every chosen entry is at least as good as every other, up to the rounding of each
        assert (sign * exact[i] + slack[i])[chosen].min() >= (sign * exact[i] - slack[i])[~chosen].max()
        # and it is nearly the selection torch makes from the materialised fp32 product
        ref = topk_flat_indices((L[i] @ R[i]).abs(), k, largest)
        assert torch.isin(idx[i], ref).float().mean() >= 0.999


@pytest.mark.parametrize("device", DEVICES)
def test_fused_selection_of_exact_svd_factors_matches_the_reference(device):
    W = torch.randn(2, 200, 150, generator=torch.Generator().manual_seed(2))
    L, R = exact_lowrank(W, 6)
    k = 1500
    idx = ops._topk_abs_product(L.to(device), R.to(device), k, True).cpu()
    ref = lk.principal_weights(W, k, 6, svd="exact")
    assert torch.isin(idx, ref).float().mean(1).min() >= 0.999  # differs only by dot-product rounding


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,rank,passes,oversample", [
    ((2, 700, 400), 4, DEFAULT_PASSES, DEFAULT_OVERSAMPLE),  # the default, on the Krylov path
    ((1, 123, 77), 5, 4, 3),  # m > n: the basis lives on the n side
    ((3, 77, 123), 5, 6, 2),
])
def test_lowrank_factors_match_the_reference(device, dtype, shape, rank, passes, oversample):
    W = _low_rank_plus_noise(*shape, rank, 3).to(dtype)
    L, R = ops._lowrank(W.to(device), rank, 11, passes, oversample)
    assert L.shape == (*shape[:-1], rank) and R.shape == (shape[0], rank, shape[-1])
    assert L.dtype == R.dtype == dtype
    gen = torch.Generator(device=device).manual_seed(11)
    Lr, Rr = fast_lowrank(W.to(device), rank, passes=passes, oversample=oversample, generator=gen)
    # Same algorithm and random start: equal up to rounding (bit-identical on the CPU in practice),
    # amplified by the conditioning of the rank-r truncation, small here (signal 20x the noise).
    # On CUDA the op's products with W run in TF32 (2^-11) where the reference's are fp32.
    tol = 100 * (2.0**-11 if _tf32_products(device, dtype) else torch.finfo(dtype).eps)
    diff = torch.linalg.matrix_norm((L @ R - Lr @ Rr).cpu()) / torch.linalg.matrix_norm((Lr @ Rr).cpu())
    assert diff.max() < tol


@pytest.mark.parametrize("device", DEVICES)
def test_principal_weights_is_the_selection_of_its_factors(device):
    W = _low_rank_plus_noise(2, 600, 420, 3, 4).to(device)
    k, r, seed = 5000, 3, 123
    idx = ops._principal_weights_seeded(W, k, r, True, seed)
    L, R = ops._lowrank(W, r, seed, DEFAULT_PASSES, DEFAULT_OVERSAMPLE)
    assert torch.equal(idx, ops._topk_abs_product(L, R, k, True))
    # and the reference, fed the same random start, selects (nearly) the same entries
    ref = lk.reference.principal_weights(W, k, r, "fast", True, torch.Generator(device=device).manual_seed(seed))
    assert torch.isin(idx, ref).float().mean(1).min() >= _agreement_floor(device, W.dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_seed_reproduces_the_selection(device):
    W = torch.randn(1, 600, 420, generator=torch.Generator().manual_seed(5)).to(device)
    a = ops._principal_weights_seeded(W, 4000, 2, True, 7)
    assert torch.equal(a, ops._principal_weights_seeded(W, 4000, 2, True, 7))
    La, _ = ops._lowrank(W, 2, 7, DEFAULT_PASSES, DEFAULT_OVERSAMPLE)
    Lb, _ = ops._lowrank(W, 2, 8, DEFAULT_PASSES, DEFAULT_OVERSAMPLE)
    assert not torch.equal(La, Lb), "the seed must reach the random start"
    # through the public API, the generator's state picks the seed
    g1, g2 = (torch.Generator().manual_seed(9) for _ in range(2))
    assert torch.equal(lk.principal_weights(W[0], 4000, 2, generator=g1),
                       lk.principal_weights(W[0], 4000, 2, generator=g2))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b,m,n,r", [(1, 123, 77, 4), (2, 4097, 3, 2), (3, 30, 500, 5), (1, 640, 350, 6)])
@pytest.mark.parametrize("largest", [True, False])
def test_principal_weights_on_odd_sizes_and_batches(device, b, m, n, r, largest):
    W = _low_rank_plus_noise(b, m, n, r, 6)
    exact = lk.principal_weights(W, (m * n) // 10, r, svd="exact", largest=largest)
    for k in (0, 1, (m * n) // 10, m * n):
        idx = ops._principal_weights_seeded(W.to(device), k, r, largest, 3).cpu()
        _assert_is_selection(idx, b, k, m, n)
        if k == m * n:
            assert torch.equal(idx, torch.arange(m * n, dtype=torch.int32).expand(b, -1))
        if k == (m * n) // 10 and largest:  # a clear rank-r structure: fast and exact agree
            assert torch.isin(idx, exact).float().mean(1).min() >= 0.99


@pytest.mark.parametrize("device", DEVICES)
def test_input_dtypes(device):
    W = _low_rank_plus_noise(2, 640, 350, 4, 7).to(device)
    k = 20000
    by_dtype = {dt: ops._principal_weights_seeded(W.to(dt), k, 4, True, 1)
                for dt in (torch.float32, torch.float64, torch.bfloat16)}
    for idx in by_dtype.values():
        _assert_is_selection(idx, 2, k, 640, 350)
    # bf16 weights are computed from their exact values; fp32 and fp64 see the same matrix
    agree = lambda a, b: torch.isin(a, b).float().mean(1).min().item()  # noqa: E731
    floor = _agreement_floor(device, torch.float32)
    assert agree(by_dtype[torch.float32], by_dtype[torch.float64]) >= floor
    bf16_as_fp32 = ops._principal_weights_seeded(W.to(torch.bfloat16).float(), k, 4, True, 1)
    if device == "cpu":  # the CPU upcasts bf16 weights: bit-identical to passing the upcast copy
        assert torch.equal(by_dtype[torch.bfloat16], bf16_as_fp32)
    else:  # the GPU reads them as bf16 (split basis, 2^-16) vs TF32 for the fp32 copy
        assert agree(by_dtype[torch.bfloat16], bf16_as_fp32) >= floor


@pytest.mark.parametrize("device", DEVICES)
def test_selection_does_not_depend_on_the_scale_of_w(device):
    # Krylov products scale as |W|^2: unscaled, 2^+-100 would overflow or underflow fp32.
    W = _low_rank_plus_noise(1, 700, 400, 4, 9).to(device)
    idx = ops._principal_weights_seeded(W, 5000, 4, True, 2)
    for scale in (2.0**-100, 2.0**100):  # powers of two: every intermediate scales exactly
        assert torch.equal(ops._principal_weights_seeded(W * scale, 5000, 4, True, 2), idx)


@pytest.mark.parametrize("device", DEVICES)
def test_degenerate_matrices(device):
    zeros = torch.zeros(2, 700, 400, device=device)  # every entry ties: the lowest indices win
    first = torch.arange(50, dtype=torch.int32).expand(2, -1)
    assert torch.equal(ops._principal_weights_seeded(zeros, 50, 4, True, 0).cpu(), first)
    g = torch.Generator().manual_seed(10)
    rank1 = torch.randn(2, 700, 1, generator=g) @ torch.randn(2, 1, 400, generator=g)  # Krylov space exhausted
    idx = ops._principal_weights_seeded(rank1.to(device), 5000, 4, True, 0).cpu()
    exact = lk.principal_weights(rank1, 5000, 1, svd="exact")
    assert torch.isin(idx, exact).float().mean(1).min() >= _agreement_floor(device, torch.float32)


@pytest.mark.parametrize("args,match", [
    (dict(W=torch.randn(30, 20)), "W must be a batch"),
    (dict(W=torch.randint(0, 5, (1, 30, 20))), "W must be float32"),
    (dict(k=-1), "k must be in"),
    (dict(k=601), "k must be in"),
    (dict(lra_rank=0), "lra_rank must be in"),
    (dict(lra_rank=21), "lra_rank must be in"),
])
def test_bad_inputs_name_the_parameter(args, match):
    call = dict(W=torch.randn(1, 30, 20), k=10, lra_rank=4, largest=True, seed=0)
    call.update(args)
    with pytest.raises(RuntimeError, match=match):
        ops._principal_weights_seeded(call["W"], call["k"], call["lra_rank"], call["largest"], call["seed"])


@pytest.mark.parametrize("L,R,k,match", [
    (torch.randn(1, 4, 2), torch.randn(1, 3, 5), 1, "do not chain"),
    (torch.randn(4, 2), torch.randn(2, 5), 1, "L must be"),
    (torch.randn(1, 4, 2), torch.randn(1, 2, 5).double(), 1, "float32 or float64"),
    (torch.randn(1, 4, 2), torch.randn(1, 2, 5), 21, "k must be in"),
])
def test_bad_factor_inputs_name_the_parameter(L, R, k, match):
    with pytest.raises(RuntimeError, match=match):
        ops._topk_abs_product(L, R, k, True)


def test_native_krylov_settings_are_the_reference_defaults():
    assert (_ext.EXT.KRYLOV_PASSES, _ext.EXT.KRYLOV_OVERSAMPLE) == (DEFAULT_PASSES, DEFAULT_OVERSAMPLE)


def test_lowrank_rejects_odd_passes():
    with pytest.raises(RuntimeError, match="passes must be"):
        ops._lowrank(torch.randn(1, 700, 400), 4, 0, 5, 8)


@pytest.mark.parametrize("device", DEVICES)
def test_ops_pass_opcheck(device):
    W = _low_rank_plus_noise(2, 40, 30, 3, 8).to(device)
    L, R = _integer_factors(2, 40, 30, 3, device)
    samples = [
        (ops._principal_weights_seeded.default, (W, 100, 3, True, 5)),
        (ops._principal_weights_seeded.default, (W.double(), 0, 2, False, 5)),
        (ops._lowrank.default, (W, 3, 5, 4, 2)),
        (ops._topk_abs_product.default, (L, R, 77, True)),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args)
