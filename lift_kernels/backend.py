"""Which backend runs each op on each device, and why.

Backends: ``reference`` (pure torch, always there), ``triton`` (kernels from the top-level triton/
folder; on CPU tensors only under TRITON_INTERPRET=1) and ``cuda`` (the compiled extension
lift_kernels._C: its CUDA kernels on GPU tensors, its C++ kernels on CPU tensors).
``LIFT_BACKEND=reference|triton|cuda`` forces one for every op it implements; if it cannot run here
the op raises instead of quietly falling back.
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Callable

from . import _ext, _triton_loader

BACKENDS = ("reference", "triton", "cuda")
OPS = ("sparse_adamw_step", "remap_state", "principal_weights")

# Order of preference per op and device type when nothing is forced.
_PREFERENCE = {
    # on the CPU, "cuda" is _C's fused C++ step (csrc/cpu/sparse_adamw_step_cpu.cpp)
    "sparse_adamw_step": {"cuda": ("triton", "cuda", "reference"), "cpu": ("cuda", "reference")},
    "remap_state": {"cuda": ("triton", "cuda", "reference"), "cpu": ("cuda", "reference")},
    "principal_weights": {"cuda": ("cuda", "triton", "reference"), "cpu": ("cuda", "reference")},
}


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run the op here."""


def forced_backend() -> str | None:
    name = os.environ.get("LIFT_BACKEND", "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise ValueError(f"LIFT_BACKEND must be one of {BACKENDS} or unset, got {name!r}")
    return name


def _triton_impl(op: str) -> Callable | None:
    try:
        return getattr(_triton_loader.load_kernel_module(op), op)
    except (ModuleNotFoundError, AttributeError):
        return None


def _native_impl(op: str) -> Callable | None:
    try:
        return getattr(importlib.import_module("lift_kernels.native_ops"), op)
    except (ModuleNotFoundError, AttributeError):
        return None


def _implementation(op: str, backend: str) -> Callable | None:
    if backend == "reference":
        return getattr(importlib.import_module("lift_kernels.reference"), op)
    if backend == "triton":
        return _triton_impl(op)
    return _native_impl(op)


def _why_not(op: str, backend: str, device_type: str) -> str | None:
    """None if ``backend`` can run ``op`` on ``device_type``, else the reason it cannot."""
    if backend == "reference":
        return None
    if backend == "triton":
        ok, why = _triton_loader.triton_usable()
        if not ok:
            return why
        if _triton_impl(op) is None:
            return f"no Triton kernel for {op}"
        if device_type == "cpu" and not _triton_loader.interpreting():
            return "Triton runs CPU tensors only under TRITON_INTERPRET=1"
        if device_type not in ("cpu", "cuda"):
            return f"Triton does not run on {device_type} tensors"
        return None
    if _ext.EXT is None:
        return _ext.EXT_ERROR or "lift_kernels._C is not built"
    if not _ext.has_native_op(op, device_type):
        other = "cpu" if device_type != "cpu" else "cuda"
        why = ("it has one for {} tensors only".format(other) if _ext.has_native_op(op, other)
               else "built without it")
        return f"lift_kernels._C has no {device_type} kernel for {op} ({why})"
    return None


def implements(backend: str, op: str) -> bool:
    """Whether ``backend`` has an implementation of ``op`` at all (on any device)."""
    if backend == "reference":
        return True
    if backend == "triton":
        return _triton_impl(op) is not None
    return _native_impl(op) is not None


def choose(op: str, device_type: str) -> tuple[str, str]:
    """(backend, reason) for ``op`` on tensors of ``device_type``; raises if a forced one can't run."""
    forced = forced_backend()
    if forced is not None and implements(forced, op):
        why = _why_not(op, forced, device_type)
        if why is not None:
            raise BackendUnavailableError(
                f"LIFT_BACKEND={forced} was forced but cannot run {op} on {device_type} tensors: {why}. "
                "Unset LIFT_BACKEND to let lift_kernels choose, or install what is missing.")
        return forced, f"forced by LIFT_BACKEND={forced}"
    prefs = _PREFERENCE[op].get(device_type, ("reference",))
    skipped = []
    for backend in prefs:
        why = _why_not(op, backend, device_type)
        if why is None:
            note = f" ({'; '.join(skipped)})" if skipped else ""
            prefix = f"LIFT_BACKEND={forced} has no {op}; " if forced else ""
            what = f": lift_kernels._C's {'C++' if device_type == 'cpu' else 'CUDA'} kernel" if backend == "cuda" else ""
            return backend, f"{prefix}default for {device_type}{what}{note}"
        skipped.append(f"{backend}: {why}")
    raise AssertionError("reference is always available")  # pragma: no cover


_CACHE: dict[tuple[str, str, str], Callable] = {}


def resolve(op: str, device_type: str) -> Callable:
    key = (op, device_type, os.environ.get("LIFT_BACKEND", "") + os.environ.get("TRITON_INTERPRET", ""))
    fn = _CACHE.get(key)
    if fn is None:
        backend, _ = choose(op, device_type)
        fn = _CACHE[key] = _implementation(op, backend)
    return fn
