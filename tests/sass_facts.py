"""What an sm_90 cubin says about its kernels: registers, spills, memory access widths, occupancy.

Reads a cubin with ``cuobjdump`` (``-res-usage`` for registers, shared and local memory; ``-sass``
for the instructions). cuobjdump ships with the CUDA toolkit and, on machines without one, inside
Triton's NVIDIA backend; ``cuobjdump_path()`` finds either. No GPU is needed.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

# One SM of an H100 / H200 (compute capability 9.0): CUDA C Programming Guide, "Technical
# Specifications per Compute Capability", and the occupancy calculator's allocation rules.
SM90 = {"regs": 65536, "max_warps": 64, "max_ctas": 32, "smem": 228 * 1024, "smem_per_cta_reserved": 1024,
        "reg_alloc_unit": 256}

# Global, local and shared memory instructions, e.g. LDG.E.EF.128, STG.E.U16, LDL.64, STS.128.
_MEMORY_OP = re.compile(r"\b((?:LDG|STG|LDL|STL|LDS|STS|LDSM|LD|ST|ATOMG|RED)(?:\.[\w]+)*)\s")
_WIDTH = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}
_RESOURCES = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def cuobjdump_path() -> str | None:
    """The CUDA toolkit's cuobjdump (on PATH or beside nvcc), else the one Triton bundles."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    nvcc = shutil.which("nvcc")
    if nvcc and (Path(nvcc).resolve().parent / "cuobjdump").exists():
        return str(Path(nvcc).resolve().parent / "cuobjdump")
    try:
        import triton
    except ImportError:
        return None
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else None


def _access(op: str) -> tuple[str, int]:
    """('LDG', 128) for LDG.E.EF.128: the instruction and the bits each thread moves."""
    parts = op.split(".")
    width = next((_WIDTH[p] for p in parts[1:] if p in _WIDTH), 32)
    return parts[0], width


def warps_per_sm(regs: int, threads: int, smem: int) -> dict:
    """Resident CTAs and warps per sm_90 SM for a kernel of ``regs`` registers per thread, CTAs of
    ``threads`` threads and ``smem`` bytes of shared memory per CTA, with the limit that binds.

    Registers are allocated per warp in units of 256, so 90 registers cost as much as 96."""
    warps_per_cta = -(-threads // 32)
    unit = SM90["reg_alloc_unit"]
    regs_per_warp = -(-regs * 32 // unit) * unit
    limits = {"ctas": SM90["max_ctas"], "warps": SM90["max_warps"] // warps_per_cta,
              "registers": SM90["regs"] // regs_per_warp // warps_per_cta if regs else SM90["max_ctas"],
              "shared_memory": SM90["smem"] // (smem + SM90["smem_per_cta_reserved"])}
    ctas = min(limits.values())
    return {"ctas_per_sm": ctas, "warps_per_sm": ctas * warps_per_cta,
            "limited_by": min(limits, key=lambda name: (limits[name], name != "registers"))}


def kernel_facts(cubin: Path, threads: dict[str, int] | int, dynamic_smem: int = 0) -> dict[str, dict]:
    """Per kernel function of ``cubin`` (mangled name): registers, shared/local/stack bytes,
    global/local/shared memory instruction counts by width in bits, spill instruction count and
    occupancy. ``threads`` is the CTA size, per function name or one for all; ``dynamic_smem`` is
    added to each function's static shared memory (Triton's kernels use dynamic shared memory)."""
    tool = cuobjdump_path()
    if tool is None:
        raise FileNotFoundError("cuobjdump not found (CUDA toolkit or Triton's NVIDIA backend)")
    usage = subprocess.run([tool, "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    sass = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    bodies = dict(re.findall(r"Function : (\S+)\n(.*?)(?=\n\s*Function : |\Z)", sass, flags=re.S))
    facts = {}
    for name, regs, stack, shared, local in _RESOURCES.findall(usage):
        regs, stack, shared, local = int(regs), int(stack), int(shared), int(local)
        ops = Counter(_access(op) for op in _MEMORY_OP.findall(bodies.get(name, "")))
        n_threads = threads if isinstance(threads, int) else threads[name]
        memory_ops = {}
        for (kind, width), n in sorted(ops.items()):
            memory_ops.setdefault(kind, {})[str(width)] = n
        facts[name] = {
            "registers": regs, "stack_bytes": stack, "local_bytes": local,
            "shared_bytes": shared + dynamic_smem, "threads": n_threads,
            "memory_ops": memory_ops,
            # register spills go to local memory: STL/LDL instructions (and a stack frame)
            "spill_ops": sum(n for (kind, _), n in ops.items() if kind in ("STL", "LDL")),
            **warps_per_sm(regs, n_threads, shared + dynamic_smem)}
    return facts


def count(facts: dict, kind: str, width: int) -> int:
    """Instructions of ``kind`` (LDG, STG, LDS, ...) moving ``width`` bits per thread."""
    return facts["memory_ops"].get(kind, {}).get(str(width), 0)
