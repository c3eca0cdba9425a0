"""The pure-torch reference ops: the oracle every kernel is tested against."""
import math

import pytest
import torch

import lift_kernels as lk
from lift_kernels.reference import exact_lowrank, fast_lowrank, remap_state, sparse_adamw_step, topk_flat_indices


def test_remap_keeps_common_entries_and_zeroes_new_ones():
    old = torch.tensor([1, 5, 9, 40], dtype=torch.int32)
    new = torch.tensor([0, 5, 9, 12, 41], dtype=torch.int32)
    m = torch.tensor([1.0, 2.0, 3.0, 4.0])
    v = torch.tensor([10.0, 20.0, 30.0, 40.0])
    m2, v2 = remap_state(old, new, [m, v])
    assert m2.tolist() == [0.0, 2.0, 3.0, 0.0, 0.0]
    assert v2.tolist() == [0.0, 20.0, 30.0, 0.0, 0.0]


@pytest.mark.parametrize("k_old,k_new", [(0, 5), (5, 0), (0, 0), (1, 1), (4097, 3001)])
def test_remap_matches_dense_oracle(k_old, k_new):
    numel = 10007
    old = torch.randperm(numel)[:k_old].sort().values.to(torch.int32)
    new = torch.randperm(numel)[:k_new].sort().values.to(torch.int32)
    s = torch.randn(k_old)
    dense = torch.zeros(numel)
    dense[old.long()] = s
    keep = torch.zeros(numel, dtype=torch.bool)
    keep[old.long()] = True
    expected = torch.where(keep[new.long()], dense[new.long()], 0.0)
    (got,) = remap_state(old, new, [s])
    assert torch.equal(got, expected)
    (via_op,) = lk.remap_state(old, new, [s])  # the default CPU backend (native if built)
    assert torch.equal(via_op, expected)


def test_topk_ties_go_to_lowest_index_and_k_is_exact():
    s = torch.tensor([[1.0, 3.0, 3.0], [3.0, 0.5, 3.0]])
    assert topk_flat_indices(s, 3).tolist() == [1, 2, 3]
    assert topk_flat_indices(s, 2, largest=False).tolist() == [0, 4]
    assert topk_flat_indices(s, 0).numel() == 0
    assert topk_flat_indices(s, 6).tolist() == list(range(6))
    batch = torch.stack([s, -s])
    assert topk_flat_indices(batch, 3).dtype == torch.int32
    assert topk_flat_indices(batch, 3)[1].tolist() == [0, 1, 4]  # -0.5, -1, then the first -3


def test_exact_lowrank_is_eckart_young():
    W = torch.randn(30, 20, dtype=torch.float64)
    L, R = exact_lowrank(W, 5)
    U, S, Vh = torch.linalg.svd(W)
    best = U[:, :5] @ torch.diag(S[:5]) @ Vh[:5]
    torch.testing.assert_close(L @ R, best)
    assert torch.linalg.matrix_norm(W - L @ R) == pytest.approx(S[5:].square().sum().sqrt().item(), rel=1e-10)


def test_fast_lowrank_matches_exact_on_decaying_spectrum():
    torch.manual_seed(1)
    U, _ = torch.linalg.qr(torch.randn(300, 300))
    V, _ = torch.linalg.qr(torch.randn(200, 200))
    S = torch.logspace(0, -3, 200)
    W = U[:, :200] @ torch.diag(S) @ V.T
    L, R = fast_lowrank(W, 16, generator=torch.Generator().manual_seed(0))
    Le, Re = exact_lowrank(W, 16)
    assert torch.linalg.matrix_norm(L @ R - Le @ Re) < 1e-4 * torch.linalg.matrix_norm(Le @ Re)


@pytest.mark.parametrize("shape", [(40, 30), (3, 50, 20)])
def test_principal_weights_exact_selects_largest_of_lowrank(shape):
    W = torch.randn(shape)
    k, r = 77, 4
    idx = lk.principal_weights(W, k, r, svd="exact")
    L, R = exact_lowrank(W, r)
    scores = (L @ R).abs().reshape(*shape[:-2], -1)
    assert idx.dtype == torch.int32 and idx.shape == (*shape[:-2], k)
    assert torch.all(idx[..., 1:] > idx[..., :-1])
    expected = scores.topk(k, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(idx.long(), expected)
    smallest = lk.principal_weights(W, k, r, svd="exact", largest=False)
    assert torch.equal(smallest.long(), (-scores).topk(k, dim=-1).indices.sort(dim=-1).values)


def test_principal_weights_fast_agrees_with_exact_on_low_rank_plus_noise():
    W = torch.randn(120, 8) @ torch.randn(8, 90) + 0.01 * torch.randn(120, 90)
    k = 540
    fast = lk.principal_weights(W, k, 8, svd="fast", generator=torch.Generator().manual_seed(3))
    exact = lk.principal_weights(W, k, 8, svd="exact")
    agreement = len(set(fast.tolist()) & set(exact.tolist())) / k
    assert agreement >= 0.99


@pytest.mark.parametrize("bad,match", [
    (dict(W=torch.randn(4)), "W must be"),
    (dict(k=-1), "k must be"),
    (dict(k=10_000), "k must be"),
    (dict(lra_rank=0), "lra_rank must be"),
    (dict(svd="approx"), "svd must be"),
])
def test_principal_weights_rejects_bad_input(bad, match):
    args = dict(W=torch.randn(30, 20), k=10, lra_rank=4, svd="exact")
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        lk.principal_weights(**args)


def _torch_adamw_on_entries(w, g, idx, steps, **hp):
    """torch.optim.AdamW on a dense copy, the same gradient every step, restricted afterwards."""
    p = torch.nn.Parameter(w.clone())
    opt = torch.optim.AdamW([p], **hp)
    for _ in range(steps):
        p.grad = g.clone()
        opt.step()
    return p.detach().view(-1)[idx.long()]


@pytest.mark.parametrize("sparse_grad", [False, True])
def test_sparse_step_is_adamw_restricted_to_entries(sparse_grad):
    w = torch.randn(13, 7)
    g = torch.randn(13, 7)
    idx = torch.tensor([0, 3, 17, 50, 90], dtype=torch.int32)
    hp = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    p = w.clone()
    m, v = torch.zeros(5), torch.zeros(5)
    grad = g.view(-1)[idx.long()] if sparse_grad else g
    for t in range(1, 4):
        sparse_adamw_step([p], [grad], [idx], [m], [v], step=t, lr=hp["lr"], beta1=0.9, beta2=0.95,
                          eps=hp["eps"], weight_decay=hp["weight_decay"])
    expected = _torch_adamw_on_entries(w, g, idx, 3, **hp)
    torch.testing.assert_close(p.view(-1)[idx.long()], expected, rtol=1e-6, atol=1e-7)
    untouched = torch.ones(91, dtype=torch.bool)
    untouched[idx.long()] = False
    assert torch.equal(p.view(-1)[untouched], w.view(-1)[untouched])


def test_sparse_step_with_fp32_master_tracks_fp32_weight():
    w32 = torch.randn(9, 9)
    g = torch.randn(9, 9)
    idx = torch.arange(0, 81, 4, dtype=torch.int32)
    k = idx.numel()
    p32, m32, v32 = w32.clone(), torch.zeros(k), torch.zeros(k)
    pb = w32.to(torch.bfloat16)
    master = pb.view(-1)[idx.long()].float()
    mb, vb = torch.zeros(k), torch.zeros(k)
    p32.view(-1)[idx.long()] = master  # start both from the bf16-representable values
    for t in range(1, 6):
        kw = dict(step=t, lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0)
        sparse_adamw_step([p32], [g], [idx], [m32], [v32], **kw)
        sparse_adamw_step([pb], [g.bfloat16()], [idx], [mb], [vb], [master], **kw)
    # the master follows the fp32 run (grads differ only by bf16 rounding); the weight is its rounding
    torch.testing.assert_close(master, p32.view(-1)[idx.long()], rtol=0, atol=2e-5)
    assert torch.equal(pb.view(-1)[idx.long()], master.bfloat16())
    assert math.isfinite(master.sum().item())
