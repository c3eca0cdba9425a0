"""Every GPU kernel compiled for sm_90 (H100/H200) and held to what its SASS must show, no GPU needed:
the contiguous streams keep their 128-bit accesses, registers stay within the budget its BLOCK /
num_warps (or thread-block plan) was chosen for, and nothing spills to local memory.

Triton kernels: each specialization the ops launch, compiled by Triton's compiler and ptxas. CUDA
kernels: every csrc/cuda/*.cu compiled by nvcc (skipped without nvcc). The facts come from
cuobjdump (the CUDA toolkit's or Triton's; skipped without either); bench/sm90_sass.py writes them
to bench/results/sm90_sass.json.
"""
from __future__ import annotations

import shutil

import pytest

from sass_facts import count, cuobjdump_path
from sm90_compile import CUDA_SOURCES, TRITON_KERNELS, cuda_facts, triton_facts

pytestmark = pytest.mark.skipif(cuobjdump_path() is None, reason="cuobjdump not found (CUDA toolkit or Triton)")
pytest.importorskip("triton")

# Per Triton op: most registers per thread and fewest resident warps per SM (what BLOCK/num_warps
# in the kernel's module were chosen for; see the comment there).
TRITON_BUDGET = {"sparse_adamw_step": {"registers": 48, "warps_per_sm": 40},
                 "remap_state": {"registers": 32, "warps_per_sm": 64},
                 # the block max and the code search add live values: Triton 3.8 allocates up to 51
                 # registers (56 with the allocation granularity: 36 warps of 2-warp programs), 3.9 48
                 "sparse_adamw8bit_step": {"registers": 56, "warps_per_sm": 36},
                 # Triton 3.6 allocates 40 registers (48 resident warps of 4-warp programs), 3.8
                 # and 3.9 32: the budget is the oldest compiler's
                 "sampled_weight_grad": {"registers": 40, "warps_per_sm": 48}}
# Thread blocks per SM of the top-k tile kernels, as column_splits plans them (kBlocksPerSm in
# topk_abs_product.cu): the cubin must fit that many.
TILE_KERNELS = ("histogram_kernel", "count_kernel", "emit_kernel")
CUDA_BLOCKS_PER_SM = {"float": 4, "double": 2}


def _no_spills(name: str, facts: dict) -> None:
    assert facts["spill_ops"] == 0 and facts["local_bytes"] == 0 and facts["stack_bytes"] == 0, (
        f"{name} spills: {facts['spill_ops']} local loads/stores, stack {facts['stack_bytes']} bytes")


def _vectors_per_thread(facts: dict) -> int:
    """128-bit accesses a thread makes to one contiguous 4-byte stream of a full block."""
    return facts["block"] // facts["threads"] // 4


@pytest.mark.parametrize("op", list(TRITON_KERNELS))
def test_triton_kernels_fit_the_register_budget_without_spills(op):
    for variant, facts in triton_facts(op).items():
        name = f"{op}[{variant}]"
        _no_spills(name, facts)
        assert facts["registers"] <= TRITON_BUDGET[op]["registers"], (name, facts["registers"])
        assert facts["warps_per_sm"] >= TRITON_BUDGET[op]["warps_per_sm"], (name, facts["warps_per_sm"])


@pytest.mark.parametrize("variant", list(TRITON_KERNELS["sparse_adamw_step"]))
def test_sparse_adamw_streams_are_128_bit(variant):
    """Full blocks read idx, m, v (and the master copy, and a gathered fp32 grad) and write m, v
    (and the master) with one 128-bit access per 4 entries; tail blocks are scalar."""
    facts = triton_facts("sparse_adamw_step")[variant]
    weight = variant.split("_")[0]
    gathered, master = "_gathered_grad" in variant, "_master" in variant and "no_master" not in variant
    n = _vectors_per_thread(facts)
    loads = 3 + master + (gathered and weight == "fp32")
    assert count(facts, "LDG", 128) == n * loads, facts["memory_ops"]
    assert count(facts, "STG", 128) == n * (2 + master), facts["memory_ops"]


@pytest.mark.parametrize("master", ["master", "no_master"])
def test_sparse_adamw_gathered_half_precision_grad_is_one_64_bit_load(master):
    """A bf16 gathered grad: 4 entries per thread in one 64-bit load (the layout of the fp32
    streams), on top of what the dense-grad kernel loads 64 bits wide (its table row)."""
    facts = triton_facts("sparse_adamw_step")
    gathered, dense = facts[f"bf16_gathered_grad_{master}"], facts[f"bf16_dense_grad_{master}"]
    assert count(gathered, "LDG", 64) - count(dense, "LDG", 64) == _vectors_per_thread(gathered), (
        gathered["memory_ops"], dense["memory_ops"])


@pytest.mark.parametrize("variant", list(TRITON_KERNELS["remap_state"]))
def test_remap_full_blocks_are_128_bit(variant):
    """Full blocks read the new indices and write every state 128 bits at a time."""
    facts = triton_facts("remap_state")[variant]
    states = int(variant.split("_")[0])
    n = _vectors_per_thread(facts)
    assert count(facts, "LDG", 128) == n, facts["memory_ops"]
    assert count(facts, "STG", 128) == n * states, facts["memory_ops"]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=[s.name for s in CUDA_SOURCES])
def test_cuda_kernels_do_not_spill(source):
    facts = cuda_facts(source)
    assert facts, f"no kernels in {source.name}"
    for name, f in facts.items():
        _no_spills(name, f)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
@pytest.mark.parametrize("scalar", list(CUDA_BLOCKS_PER_SM))
def test_topk_tile_kernels_fit_the_planned_blocks_and_load_tiles_128_bit(scalar):
    """Each tile kernel fits the thread blocks per SM column_splits plans for, and its product loop
    reads L and R from shared memory 16 bytes at a time: fewer element-wide shared loads than one
    step of the loop would take (8) if it read them one by one."""
    facts = cuda_facts(next(s for s in CUDA_SOURCES if s.name == "topk_abs_product.cu"))
    bits = {"float": 32, "double": 64}[scalar]
    for kernel in TILE_KERNELS:
        f = facts[f"{kernel}<{scalar}>"]
        assert f["ctas_per_sm"] >= CUDA_BLOCKS_PER_SM[scalar], (kernel, scalar, f["registers"], f["limited_by"])
        assert count(f, "LDS", 128) >= 2 and count(f, "LDS", bits) < 8, (kernel, scalar, f["memory_ops"])
