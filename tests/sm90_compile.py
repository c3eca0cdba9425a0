"""Compile every lift_kernels GPU kernel for the H100/H200 (sm_90) on any machine, no GPU needed.

The interpreter runs the Triton kernels' Python, not their compiled form; compiling for sm_90
catches what only the compiler sees (types, loops, constexpr use) and, through the SASS, shows what
the kernels cost at run time (tests/sass_facts.py): registers, spills, memory access widths.

- Triton: every specialization in TRITON_KERNELS, compiled by Triton's own compiler and ptxas in a
  fresh interpreter without TRITON_INTERPRET (under it kernels are not compilable):
  ``python tests/sm90_compile.py sparse_adamw_step`` prints JSON facts; ``triton_facts(op)`` runs
  that from a test.
- CUDA: every csrc/cuda/*.cu compiled to a cubin by nvcc with setup.py's flags (``cuda_facts``).
"""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sass_facts import kernel_facts  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
# setup.py's nvcc flags; the C++ standard torch >= 2.13 builds extensions with
NVCC_FLAGS = ["-std=c++20", "-O3", "--use_fast_math", "-arch=sm_90"]

_PTR16 = [["tt.divisibility", 16]]
_DTYPE = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}


def _adamw(weight: str, gathered_grad: bool, master: bool) -> tuple:
    """The step for ``weight`` weights and grads of the same dtype, as the optimizer launches it:
    block size and warps from the module, every stream 16-byte aligned."""
    return ("_sparse_adamw_kernel", {
        "table_ptr": "*i64", "param_base": _DTYPE[weight], "grad_base": _DTYPE[weight], "idx_base": "*i32",
        "state_base": "*fp32", "decay": "fp32", "one_minus_beta1": "fp32", "beta2": "fp32",
        "one_minus_beta2": "fp32", "bias_correction2_sqrt": "fp32", "step_size": "fp32", "eps": "fp32",
        "GATHERED_GRAD": "constexpr", "MASTER": "constexpr", "ALIGNED": "constexpr", "BLOCK": "constexpr"},
        {"GATHERED_GRAD": gathered_grad, "MASTER": master, "ALIGNED": True}, range(5))


def _adamw8bit(weight: str, gathered_grad: bool, master: bool) -> tuple:
    """The 8-bit-moment step for ``weight`` weights and grads of the same dtype."""
    return ("_sparse_adamw8bit_kernel", {
        "table_ptr": "*i64", "param_base": _DTYPE[weight], "grad_base": _DTYPE[weight], "idx_base": "*i32",
        "code_base": "*u8", "f32_base": "*fp32", "m_book_ptr": "*fp32", "m_mid_ptr": "*fp32",
        "v_book_ptr": "*fp32", "v_mid_ptr": "*fp32", "decay": "fp32", "one_minus_beta1": "fp32", "beta2": "fp32",
        "one_minus_beta2": "fp32", "bias_correction2_sqrt": "fp32", "step_size": "fp32", "eps": "fp32",
        "GATHERED_GRAD": "constexpr", "MASTER": "constexpr", "BLOCK": "constexpr"},
        {"GATHERED_GRAD": gathered_grad, "MASTER": master}, range(10))


def _remap(states: int) -> tuple:
    """The remap of ``states`` fp32 states (the optimizer's m, v and master)."""
    return ("_remap_kernel", {
        "old_idx_ptr": "*i32", "new_idx_ptr": "*i32", "k_old": "i32", "k_new": "i32",
        **{f"{kind}{i}": "*fp32" for i in range(4) for kind in ("src", "dst")},
        "NUM_STATES": "constexpr", "BLOCK": "constexpr"}, {"NUM_STATES": states}, [0, 1, *range(4, 12)])


def _sampled_grad(dtype: str) -> tuple:
    """The SDDMM on contiguous (T, m) / (T, n) inputs of ``dtype``: their column strides are 1, which
    Triton specializes as a constant at launch."""
    return ("_sampled_grad_kernel", {
        "g_ptr": _DTYPE[dtype], "x_ptr": _DTYPE[dtype], "idx_ptr": "*i32", "out_ptr": "*fp32", "T": "i32",
        "n": "i32", "k": "i32", "stride_gt": "i32", "stride_gm": "constexpr", "stride_xt": "i32",
        "stride_xn": "constexpr", "BLOCK": "constexpr", "BLOCK_T": "constexpr"},
        {"stride_gm": 1, "stride_xn": 1}, range(4))


# Per op, per specialization: (kernel, argument types, constexpr values, 16-byte aligned pointer
# arguments). BLOCK, the other tile sizes and num_warps are the module's own.
TRITON_KERNELS = {
    "sparse_adamw_step": {
        f"{weight}_{'gathered' if gathered else 'dense'}_grad_{'master' if master else 'no_master'}":
            _adamw(weight, gathered, master)
        for weight in ("fp32", "bf16") for gathered in (False, True) for master in (False, True)},
    "remap_state": {f"{n}_fp32_states": _remap(n) for n in (2, 3)},
    # two of the four specializations per dtype keep the compile check short: the bucket layouts of
    # an fp32 model (no master, dense grad) and a bf16 one (master, gathered grad)
    "sparse_adamw8bit_step": {"fp32_dense_grad_no_master": _adamw8bit("fp32", False, False),
                              "bf16_gathered_grad_master": _adamw8bit("bf16", True, True)},
    "sampled_weight_grad": {f"{dtype}_inputs": _sampled_grad(dtype) for dtype in ("fp32", "bf16")},
}


def _compile_triton(op: str) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lift_kernels._triton_loader import load_kernel_module

    module = load_kernel_module(op)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant, (fn_name, signature, constexprs, aligned) in TRITON_KERNELS[op].items():
            fn = getattr(module, fn_name)
            # BLOCK and the module's other tile sizes (a constexpr named as a module constant)
            tiles = {p.name: getattr(module, p.name) for p in fn.params if p.is_constexpr and hasattr(module, p.name)}
            constexprs = {**tiles, **constexprs, "BLOCK": module.BLOCK}
            src = ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                            attrs={(i,): _PTR16 for i in aligned})
            compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": module.NUM_WARPS})
            ptx = compiled.asm["ptx"]
            cubin = Path(tmp) / f"{variant}.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            sass = kernel_facts(cubin, 32 * compiled.metadata.num_warps, compiled.metadata.shared)
            out[variant] = {
                "param_types": re.findall(r"\.param \.(\w+)(?: \.ptr)?[^\n]*_param_\d+", ptx),
                "constexpr_args": [p.name for p in fn.params if p.is_constexpr],
                "ptx_memory_ops": dict(Counter(re.findall(r"((?:ld|st)\.global[\w.:]*)", ptx))),
                "block": module.BLOCK, "triton": triton.__version__, **sass[fn_name]}
    return out


@functools.cache
def triton_facts(op: str) -> dict[str, dict]:
    """Facts of every specialization of ``op``'s Triton kernel, compiled in a fresh interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, __file__, op], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def readable_kernel_name(mangled: str) -> str:
    """``emit_kernel<float>`` for ``_ZN4lift4cuda..._111emit_kernelIfEEv...`` (a mangled name's
    length digits precede it; I...E holds the template arguments; our kernels are snake_case)."""
    found = re.search(r"\d([a-z][a-z_]*_kernel)I([a-z])E", mangled)
    if not found:
        return mangled
    return f"{found[1]}<{ {'f': 'float', 'd': 'double'}.get(found[2], found[2])}>"


@functools.cache
def cuda_facts(source: Path) -> dict[str, dict]:
    """Facts of every kernel of one .cu file, compiled by nvcc to an sm_90 cubin, by readable name
    (the kernels' CTA size is the file's kThreads, read from the source)."""
    nvcc = shutil.which("nvcc")
    assert nvcc, "nvcc not found"
    threads = int(re.search(r"constexpr int kThreads = (\d+);", source.read_text())[1])
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / (source.stem + ".cubin")
        run = subprocess.run([nvcc, *NVCC_FLAGS, "-I", str(ROOT / "csrc"), "-cubin", str(source), "-o", str(cubin)],
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        facts = kernel_facts(cubin, threads)
    return {readable_kernel_name(name): f for name, f in facts.items()}


if __name__ == "__main__":
    sys.path.append(str(ROOT))  # this checkout's lift_kernels when none is installed
    print(json.dumps(_compile_triton(sys.argv[1])))
