"""What decides how a CPU run rounds: the machine, the torch build, its BLAS, and the knobs that move them.

Two runs of the same float code agree bit for bit only when every one of these agrees. MKL and
oneDNN pick their kernels by CPU vendor and microarchitecture (an Intel Xeon and an AMD EPYC that
both report AVX-512 take different GEMM and LAPACK paths), torch's own kernels by its CPU
capability, and environment variables can force other paths. A record of a run keeps this
fingerprint; a replay elsewhere knows it cannot expect the same bits.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

# Environment variables that change which kernels MKL, oneDNN, OpenBLAS or ATen run.
NUMERICS_ENV = ("MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE", "ATEN_CPU_CAPABILITY",
                "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "OPENBLAS_CORETYPE")


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def fingerprint() -> dict[str, str]:
    """CPU vendor, model and feature flags, torch build, its BLAS/LAPACK configuration and the
    numerics environment variables that are set."""
    import platform

    cpu = _cpuinfo()
    flags = cpu.get("flags", "")
    config = torch.__config__.show()
    return {
        "cpu": " / ".join(cpu.get(k, "?") for k in ("vendor_id", "model name", "cpu family", "model", "stepping"))
        if cpu else platform.processor() or platform.machine(),
        "cpu_flags": hashlib.sha1(flags.encode()).hexdigest()[:12],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": str(torch.__version__),
        # the build's BLAS, LAPACK, MKL and oneDNN versions and options, as torch reports them
        "torch_config": hashlib.sha1(config.encode()).hexdigest()[:12],
        "env": ",".join(f"{k}={os.environ[k]}" for k in NUMERICS_ENV if k in os.environ),
    }


def differences(a: dict[str, str], b: dict[str, str]) -> list[str]:
    """The fields in which two fingerprints differ, as 'field: a != b'."""
    return [f"{k}: {a.get(k)!r} != {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
