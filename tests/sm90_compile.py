"""Compile a lift_kernels Triton kernel for the H100 (sm_90) on any machine, no GPU needed.

The interpreter runs the kernels' Python, not their compiled form; compiling for sm_90 catches what
only the compiler sees (types, loops, constexpr use) and shows what the kernel takes at run time.
Run as a script in a fresh interpreter without TRITON_INTERPRET (under it kernels are not
compilable): ``python tests/sm90_compile.py sparse_adamw_step`` prints JSON facts about the PTX.
``compile_facts(name)`` does that from a test.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_PTR16 = [["tt.divisibility", 16]]
# Per op: the kernel, its argument types, constexpr values (a typical launch: bf16 weights, or two
# fp32 states for the remap) and which arguments are 16-byte aligned pointers.
KERNELS = {
    "sparse_adamw_step": ("_sparse_adamw_kernel", {
        "table_ptr": "*i64", "param_base": "*bf16", "grad_base": "*bf16", "idx_base": "*i32",
        "state_base": "*fp32", "decay": "fp32", "one_minus_beta1": "fp32", "beta2": "fp32",
        "one_minus_beta2": "fp32", "bias_correction2_sqrt": "fp32", "step_size": "fp32", "eps": "fp32",
        "ALIGNED": "constexpr", "BLOCK": "constexpr"}, {"ALIGNED": True, "BLOCK": 1024}, range(5)),
    "remap_state": ("_remap_kernel", {
        "old_idx_ptr": "*i32", "new_idx_ptr": "*i32", "k_old": "i32", "k_new": "i32",
        **{f"{kind}{i}": "*fp32" for i in range(4) for kind in ("src", "dst")},
        "NUM_STATES": "constexpr", "BLOCK": "constexpr"}, {"NUM_STATES": 2, "BLOCK": 1024},
        [0, 1, *range(4, 12)]),
}


def _compile(name: str) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lift_kernels._triton_loader import load_kernel_module

    fn_name, signature, constexprs, aligned = KERNELS[name]
    fn = getattr(load_kernel_module(name), fn_name)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                    attrs={(i,): _PTR16 for i in aligned})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    params = re.findall(r"\.param \.(\w+)(?: \.ptr)?[^\n]*_param_\d+", ptx)
    return {"param_types": params,
            "constexpr_args": [p.name for p in fn.params if p.is_constexpr],
            "memory_ops": dict(Counter(re.findall(r"((?:ld|st)\.global[\w.:]*)", ptx)))}


def compile_facts(name: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, __file__, name], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(_compile(sys.argv[1])))
