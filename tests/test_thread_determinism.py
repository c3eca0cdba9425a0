"""The C++ CPU kernels give the same bits at any thread count (issue 18, item 2): _C is built with
OpenMP, so at::parallel_for really splits the sparse AdamW step, remap_state and the selection over
threads, and no result may depend on how. Inputs are large enough that every kernel splits its work
(the step's grain is 2^15 entries, remap_state's 2^16), with odd sizes so ranges end mid-tile."""
import pytest
import torch

from lift_kernels import _ext
from lift_kernels.optim.cpu_threads import intra_op_threads

C = _ext.EXT
pytestmark = pytest.mark.skipif(C is None, reason="lift_kernels._C is not built")
THREADS = (1, 2, 3)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _at_each_thread_count(fn):
    """fn() run at 1, 2 and 3 threads, each on fresh copies of the same inputs; the results."""
    out = []
    for n in THREADS:
        with intra_op_threads(n):
            assert C.parallel_for_threads() == (n if C.openmp_version() else 1)
            out.append(fn())
    return out


def _same_bits(results):
    first = results[0]
    for other in results[1:]:
        for a, b in zip(first, other, strict=True):
            assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8) if a.dtype != torch.int32 else a,
                                                      b.view(torch.uint8) if b.dtype != torch.int32 else b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gathered", [False, True])
def test_step_is_bit_identical_at_any_thread_count(dtype, gathered):
    g = torch.Generator().manual_seed(hash((str(dtype), gathered)) % 2**31)
    shapes = [(301, 257), (3, 5), (517, 263)]  # odd; 30,000 + 7 + 70,000 entries in a row of them
    ks = [30001, 7, 70003]
    params = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    idxs = [torch.randperm(p.numel(), generator=g)[:k].sort().values.int() for p, k in zip(params, ks)]
    grads = [torch.randn(k if gathered else p.numel(), generator=g).to(dtype).reshape(-1 if gathered else p.shape)
             for p, k in zip(params, ks)]
    ms = [torch.randn(k, generator=g) * 0.1 for k in ks]
    vs = [torch.rand(k, generator=g) * 0.01 for k in ks]
    masters = [p.flatten()[i.long()].float() + 1e-4 if dtype != torch.float32 else None
               for p, i in zip(params, idxs)]

    def step():
        p2, m2, v2 = [p.clone() for p in params], [m.clone() for m in ms], [v.clone() for v in vs]
        w2 = [w.clone() if w is not None else None for w in masters]
        for t in (1, 2, 3):
            C.sparse_adamw_step_cpu(p2, grads, idxs, m2, v2, w2, t, 1e-3, 0.9, 0.999, 1e-8, 0.01)
        return p2 + m2 + v2 + [w for w in w2 if w is not None]

    results = _at_each_thread_count(step)
    assert not torch.equal(results[0][0], params[0])  # the step did update
    _same_bits(results)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gathered", [False, True])
def test_8bit_step_is_bit_identical_at_any_thread_count(dtype, gathered):
    """The 8-bit step splits the blocks of 256 entries (one scale each) over threads, 64 blocks at
    least per thread: 100,011 entries in odd weights make several ranges, some ending mid-weight."""
    from lift_kernels.reference.moment_codes import EXP_AVG_BOOK, EXP_AVG_SQ_BOOK, quantize_blockwise
    g = torch.Generator().manual_seed(hash((str(dtype), gathered, 8)) % 2**31)
    shapes = [(301, 257), (3, 5), (517, 263)]
    ks = [30001, 7, 70003]
    params = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    idxs = [torch.randperm(p.numel(), generator=g)[:k].sort().values.int() for p, k in zip(params, ks)]
    grads = [torch.randn(k if gathered else p.numel(), generator=g).to(dtype).reshape(-1 if gathered else p.shape)
             for p, k in zip(params, ks)]
    ms = [quantize_blockwise(torch.randn(k, generator=g) * 0.1, EXP_AVG_BOOK) for k in ks]
    vs = [quantize_blockwise(torch.rand(k, generator=g) * 0.01, EXP_AVG_SQ_BOOK) for k in ks]
    masters = [p.flatten()[i.long()].float() + 1e-4 if dtype != torch.float32 else None
               for p, i in zip(params, idxs)]

    def step():
        p2 = [p.clone() for p in params]
        state = [[t.clone() for t in ts] for ts in ([c for c, _ in ms], [s for _, s in ms], [c for c, _ in vs],
                                                     [s for _, s in vs])]
        w2 = [w.clone() if w is not None else None for w in masters]
        for t in (1, 2, 3):
            C.sparse_adamw8bit_step_cpu(p2, grads, idxs, *state, w2, EXP_AVG_BOOK, EXP_AVG_SQ_BOOK, t, 1e-3, 0.9,
                                        0.999, 1e-8, 0.01)
        return p2 + [t for ts in state for t in ts] + [w for w in w2 if w is not None]

    results = _at_each_thread_count(step)
    assert not torch.equal(results[0][0], params[0])  # the step did update
    _same_bits(results)


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,))
def test_remap_state_is_bit_identical_at_any_thread_count(dtype):
    g = torch.Generator().manual_seed(7)
    universe = 1_000_003
    old = torch.randperm(universe, generator=g)[:200_001].sort().values.int()
    new = torch.randperm(universe, generator=g)[:180_007].sort().values.int()
    states = [torch.randn(old.numel(), generator=g).to(dtype) for _ in range(3)]
    results = _at_each_thread_count(lambda: C.remap_state_cpu(old, new, states))
    _same_bits(results)
    # and right: an entry kept moves with its index, a new one starts at 0
    pos = {int(x): i for i, x in enumerate(old.tolist())}
    src = torch.tensor([pos.get(int(x), -1) for x in new.tolist()])
    want = torch.where(src >= 0, states[0][src.clamp(min=0)], torch.zeros((), dtype=dtype))
    assert torch.equal(results[0][0], want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("largest", [True, False])
def test_selection_with_ties_is_bit_identical_and_takes_the_lowest_indices(dtype, largest):
    # L R of small integers: |L R| holds a few values, each many times, so the k-th value is tied
    # across tiles and threads; ties go to the lowest flat indices.
    g = torch.Generator().manual_seed(11)
    b, m, r, n, k = 2, 301, 3, 257, 20011  # 3 row tiles of 2^15 entries per matrix
    L = torch.randint(-1, 2, (b, m, r), generator=g).to(dtype)
    R = torch.randint(-1, 2, (b, r, n), generator=g).to(dtype)
    results = _at_each_thread_count(lambda: [C.topk_abs_product_cpu(L, R, k, largest)])
    _same_bits(results)
    absprod = (L @ R).abs().flatten(1)  # exact: small integers
    for i in range(b):
        order = torch.sort(absprod[i], descending=largest, stable=True).indices[:k]
        assert torch.equal(results[0][0][i].long(), order.sort().values)


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,))
@pytest.mark.parametrize("order", ["sorted", "random"])
def test_sampled_weight_grad_is_bit_identical_at_any_thread_count(dtype, order):
    """Each entry sums its T products in a fixed order whichever thread takes it and whichever entries
    of its row share its pass: 20,011 entries (sorted: runs of one row that ranges cut mid-run; random:
    repeats, no runs) at T = 129, so every range and the padded lane tail are exercised."""
    g = torch.Generator().manual_seed(hash((str(dtype), order)) % 2**31)
    T, m, n, k = 129, 301, 257, 20011
    grad_out = torch.randn(T, m, generator=g).to(dtype)
    x = torch.randn(T, n, generator=g).to(dtype)
    idx = (torch.randperm(m * n, generator=g)[:k].sort().values if order == "sorted"
           else torch.randint(0, m * n, (k,), generator=g)).int()
    results = _at_each_thread_count(lambda: [C.sampled_weight_grad_cpu(grad_out, x, idx)])
    _same_bits(results)
    # and each value is the same whether computed in a run of its row or alone
    alone = torch.cat([C.sampled_weight_grad_cpu(grad_out, x, idx[j:j + 1]) for j in range(0, k, 997)])
    assert torch.equal(alone, results[0][0][::997])
