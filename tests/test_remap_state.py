"""The Triton refresh state remap against the reference op (on CPU under TRITON_INTERPRET=1)."""
from __future__ import annotations

import pytest
import torch

from lift_kernels._triton_loader import load_kernel_module
from lift_kernels.ops import use_backend
from lift_kernels.reference import remap_state as reference_remap
from sm90_compile import triton_facts

kernels = load_kernel_module("remap_state")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _sorted_indices(numel: int, k: int) -> torch.Tensor:
    return torch.randperm(numel, device=DEVICE)[:k].sort().values.to(torch.int32)


def _reselect(old: torch.Tensor, numel: int, keep: float) -> torch.Tensor:
    """A new selection of the same size that keeps about ``keep`` of ``old`` (like a refresh)."""
    kept = old[torch.rand(old.numel(), device=DEVICE) < keep].long()
    pool = torch.ones(numel, dtype=torch.bool, device=DEVICE)
    pool[old.long()] = False
    fresh = pool.nonzero().squeeze(1)
    fresh = fresh[torch.randperm(fresh.numel(), device=DEVICE)[:old.numel() - kept.numel()]]
    return torch.cat([kept, fresh]).sort().values.to(torch.int32)


def _states(k: int) -> list[torch.Tensor]:
    return [torch.randn(k, device=DEVICE), torch.rand(k, device=DEVICE),
            torch.randn(k, device=DEVICE, dtype=torch.float64), torch.randn(k, device=DEVICE).bfloat16(),
            torch.randint(-9, 9, (k,), device=DEVICE, dtype=torch.int32)]


def _assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.device == w.device
        assert torch.equal(g, w)


@pytest.mark.parametrize("numel, k, keep", [
    (123 * 77, 2000, 0.9),     # odd shape, typical refresh
    (5 * 7, 1, 0.0),           # one entry
    (50_000, 4097, 0.5),       # odd k over several blocks
    (3000, 3000, 1.0),         # everything selected: identical selections
    (1 << 20, 2500, 0.7),      # sparse: a block's indices span far apart
])
def test_matches_reference(numel, k, keep):
    old = _sorted_indices(numel, k)
    new = _reselect(old, numel, keep)
    states = _states(k)  # five states: more than one launch's MAX_STATES
    _assert_same(kernels.remap_state(old, new, states), reference_remap(old, new, states))


@pytest.mark.parametrize("k_old, k_new", [(0, 7), (7, 0), (0, 0), (3, 4097), (4097, 3)])
def test_sizes_that_differ_or_are_empty(k_old, k_new):
    old, new = _sorted_indices(10_000, k_old), _sorted_indices(10_000, k_new)
    states = _states(k_old)[:2]
    _assert_same(kernels.remap_state(old, new, states), reference_remap(old, new, states))


def test_disjoint_and_interleaved_selections():
    evens = torch.arange(0, 8000, 2, device=DEVICE, dtype=torch.int32)
    states = _states(evens.numel())[:2]
    for new in (evens + 1, torch.arange(0, 8000, 3, device=DEVICE, dtype=torch.int32)[:evens.numel()]):
        _assert_same(kernels.remap_state(evens, new, states), reference_remap(evens, new, states))


def test_searches_in_int64_indices():
    old = _sorted_indices(70_000, 3000).long()
    new = _reselect(old.int(), 70_000, 0.6).long()
    states = _states(3000)[:1]
    _assert_same(kernels.remap_state(old, new, states), reference_remap(old, new, states))


def test_registered_op_passes_opcheck():
    old = _sorted_indices(5000, 1500)
    new = _reselect(old, 5000, 0.8)
    with use_backend("triton"):
        torch.library.opcheck(torch.ops.lift_kernels.remap_state.default, (old, new, _states(1500)[:3]),
                              test_utils=("test_schema", "test_faketensor"))


def test_compiles_for_h100():
    for variant, facts in triton_facts("remap_state").items():
        assert facts["constexpr_args"] == ["NUM_STATES", "BLOCK"], variant
        assert any(op.startswith("st.global") for op in facts["ptx_memory_ops"]), variant  # states are written
