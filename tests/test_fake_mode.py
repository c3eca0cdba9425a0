"""LIFTAdamW under FakeTensorMode: every op path it takes runs on fake tensors (bench/sim_memory.py
simulates real-size memory this way), and real runs draw the same random numbers as before."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

import lift_kernels as lk
from lift_kernels import _ext
from lift_kernels.ops import use_backend
from lift_kernels.optim.cpu_threads import intra_op_threads
from lift_kernels.reference import topk_flat_indices


def _model():
    # 320 x 352 with lra_rank 1 keeps the Krylov basis (6 * (1 + 48) = 294 columns) narrower than
    # the matrix, so the reference takes its randomized path rather than the exact SVD.
    return torch.nn.Sequential(torch.nn.Linear(352, 320, dtype=torch.bfloat16), torch.nn.ReLU(),
                               torch.nn.Linear(320, 24, dtype=torch.bfloat16))


@pytest.mark.parametrize("backend", ["", "reference"])
@pytest.mark.parametrize("svd", ["fast", "exact"])
def test_two_steps_with_a_refresh_under_fake_mode(backend, svd):
    # two intra-op threads: the selection would run its buckets on worker threads, outside the mode
    with use_backend(backend or None), intra_op_threads(2), FakeTensorMode():
        model = _model()
        opt = lk.LIFTAdamW(model.parameters(), rank=2, lra_rank=1, update_interval=2, sparse_grad=True,
                           svd=svd)
        lift = opt.lift_parameters()
        for _ in range(2):  # step 1 selects, step 2 re-selects (2 % update_interval == 0)
            model(torch.randn(8, 352, dtype=torch.bfloat16)).float().square().mean().backward()
            # the sparse-grad hook gathered (k,) fp32 gradients into p.grad (a GatheredGrad)
            assert [tuple(p.grad.values.shape) for p in lift] == [(2 * (320 + 352),), (2 * (24 + 320),)]
            assert all(is_fake(p.grad.values) and p.grad.values.dtype == torch.float32 for p in lift)
            opt.step()
            opt.zero_grad()
    for p in lift:
        state = opt.state[p]
        k = 2 * sum(p.shape)
        assert state["step"] == 2 and state["selected_at"] == 2
        assert is_fake(state["idx"]) and state["idx"].dtype == torch.int32 and state["idx"].shape == (k,)
        for name in ("exp_avg", "exp_avg_sq", "master"):  # bf16 weights get fp32 masters by default
            assert is_fake(state[name]) and state[name].dtype == torch.float32 and state[name].shape == (k,)
    biases = [p for p in model.parameters() if p.dim() == 1]
    assert all(opt.state[p]["exp_avg"].shape == p.shape for p in biases)  # dense AdamW ran on them


def test_reference_topk_under_fake_mode_has_the_result_shape():
    with FakeTensorMode():
        out = topk_flat_indices(torch.randn(3, 40, 50), 17)
    assert is_fake(out) and out.shape == (3, 17) and out.dtype == torch.int32


needs_native = pytest.mark.skipif(_ext.EXT is None, reason="lift_kernels._C is not built")


@needs_native
def test_native_selection_seed_is_the_generators_first_draw():
    """Real runs are unchanged: the native kernel gets the seed a plain randint draw gives."""

    # Every singular value of W is 1: its best rank-1 approximation is whatever direction the random
    # sketch starts from, so the selection depends on the seed (lra_rank 1 keeps the Krylov basis,
    # 294 columns, narrower than the matrix: the randomized path, not the exact SVD).
    W = torch.linalg.qr(torch.randn(352, 320, generator=torch.Generator().manual_seed(1))).Q.mT[None]
    with use_backend("native"):
        idx = lk.principal_weights(W, 3000, 1, generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    seed = int(torch.randint(0, 2**62, (1,), generator=gen).item())
    assert torch.equal(idx, torch.ops.lift_kernels._principal_weights_seeded(W, 3000, 1, True, seed))
    # and another seed gives another selection, so the comparison above can fail
    assert not torch.equal(idx, torch.ops.lift_kernels._principal_weights_seeded(W, 3000, 1, True, seed + 1))


@needs_native
def test_fake_selection_consumes_the_same_randomness_as_a_real_one():
    real_gen, fake_gen = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    with use_backend("native"):
        lk.principal_weights(torch.randn(96, 80), 300, 4, generator=real_gen)
        with FakeTensorMode():
            out = lk.principal_weights(torch.randn(96, 80), 300, 4, generator=fake_gen)
    assert is_fake(out) and out.shape == (300,)
    assert torch.equal(real_gen.get_state(), fake_gen.get_state())
