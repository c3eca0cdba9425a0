"""Which backend runs each op on each device, and why; registers its kernels with torch.library.

Backends: ``reference`` (pure torch, lift_kernels.reference: the ops' CompositeExplicitAutograd
kernels, library.py), ``triton`` (kernels in the top-level triton/ folder; on CPU tensors only under
TRITON_INTERPRET=1) and ``native`` (the compiled extension lift_kernels._C: C++ kernels for CPU
tensors, CUDA kernels for GPU tensors). For each op and device this module registers the chosen
backend's kernel at the device's dispatch key (CPU, CUDA); torch's dispatcher does the rest, so a
call costs no lookup here.

Defaults: on the CPU ``native`` where _C has the kernel, else the reference; on CUDA ``triton``
where it has the op (sparse_adamw_step, sparse_adamw8bit_step, remap_state, sampled_weight_grad) and can run, else ``native``, else the
reference. Where _C compiles on first use, ``native`` is registered as a stand-in whose first call
builds it (load_native) and then registers again with what the build gave.
``LIFT_BACKEND=reference|triton|native`` forces one backend for every op it implements (the others
keep their defaults); where it cannot run, the op raises BackendUnavailableError instead of falling
back quietly.

LIFT_BACKEND is read when lift_kernels is imported (an unknown name fails the import with a
ValueError that lists the names). ``use_backend(name)`` re-registers at run time:
``use_backend("reference")`` forces, ``use_backend(None)`` restores the defaults, ``use_backend()``
follows LIFT_BACKEND again; used as a context manager it restores the previous choice on exit. The
reasons (lk.info()) and errors name what forced a backend: ``LIFT_BACKEND=x`` or ``use_backend('x')``.
"""
from __future__ import annotations

import os
from collections.abc import Callable

import torch

from .. import _triton_loader
from . import native
from .library import NAMESPACE, OPS

BACKENDS = ("reference", "triton", "native")
_TRITON_OPS = ("sparse_adamw_step", "sparse_adamw8bit_step", "remap_state", "sampled_weight_grad")
_DEFAULTS = {"cpu": ("native",), "cuda": ("triton", "native")}  # then the reference
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
_FROM_ENV = object()


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run the op here."""


def devices() -> list[str]:
    """The device types whose kernels are chosen here: the CPU, and CUDA where torch can use it."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _triton_kernel(op: str) -> Callable:
    return getattr(_triton_loader.load_kernel_module(op), op)


def implements(backend: str, op: str) -> bool:
    """Whether ``backend`` has an implementation of ``op`` at all (on some device)."""
    return backend == "reference" or (backend == "triton" and op in _TRITON_OPS) or (
        backend == "native" and native.implements(op))


def _why_not(op: str, backend: str, device_type: str) -> str | None:
    """None if ``backend`` (which implements ``op``) can run it on ``device_type``, else the reason."""
    if backend == "native":
        return native.why_not(op, device_type)
    if backend == "triton":
        ok, why = _triton_loader.triton_usable()
        if not ok:
            return why
        if device_type == "cpu" and not _triton_loader.interpreting():
            return "Triton runs CPU tensors only under TRITON_INTERPRET=1"
        if device_type not in ("cpu", "cuda"):
            return f"Triton does not run on {device_type} tensors"
    return None


def _kernel(op: str, backend: str, device_type: str) -> Callable | None:
    """What to register at the device's key for ``backend``; None for the reference (the default kernel)."""
    if backend == "triton":
        return _triton_kernel(op)
    if backend == "native":
        return native.kernel(op, device_type)
    return None


def parse(name: str | None) -> str | None:
    """A LIFT_BACKEND value as a backend name (None: unset), or ValueError."""
    name = (name or "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        hint = (" ('cuda' is now 'native': lift_kernels._C's C++ and CUDA kernels)" if name == "cuda" else "")
        raise ValueError(f"LIFT_BACKEND must be one of {BACKENDS} or unset, got {name!r}{hint}")
    return name


def forced_by(forced: str | None, from_env: bool) -> str | None:
    """What forced ``forced``, as reasons and errors name it: "LIFT_BACKEND=x" or "use_backend('x')"."""
    if forced is None:
        return None
    return f"LIFT_BACKEND={forced}" if from_env else f"use_backend({forced!r})"


def choose(op: str, device_type: str, forced: str | None, from_env: bool = True) -> tuple[str, str]:
    """(backend, reason) for ``op`` on ``device_type`` tensors; raises BackendUnavailableError if the
    ``forced`` backend implements the op but cannot run it there. ``from_env``: LIFT_BACKEND forced it,
    else a use_backend() call (the reason and the error name the one that did)."""
    origin = forced_by(forced, from_env)
    if forced is not None and implements(forced, op):
        why = _why_not(op, forced, device_type)
        if why is not None:
            undo = ("Unset LIFT_BACKEND (or call lift_kernels.ops.use_backend(None))" if from_env
                    else "Call lift_kernels.ops.use_backend(None) (or leave the use_backend block)")
            raise BackendUnavailableError(
                f"{origin} was forced but cannot run {op} on {device_type} tensors: {why}. "
                f"{undo} to let lift_kernels choose, or install what is missing.")
        return forced, f"forced by {origin}"
    prefix = f"{origin} has no {op}; " if forced is not None else ""
    skipped = []
    for backend in _DEFAULTS.get(device_type, ()):
        if not implements(backend, op):
            continue
        why = _why_not(op, backend, device_type)
        if why is None:
            break
        skipped.append(f"{backend} skipped: {why}")
    else:
        backend = "reference"
    note = f" ({'; '.join(skipped)})" if skipped else ""
    return backend, f"{prefix}default for {device_type}{note}"


def _unavailable(error: BackendUnavailableError) -> Callable:
    def kernel(*args, **kwargs):
        raise BackendUnavailableError(str(error))
    return kernel


class _Registry:
    """The kernel chosen for each (op, device), and why; torch.library dispatches to it.

    Each (op, device key) gets one registered kernel, once, that calls the kernel chosen now: a
    re-registration only swaps entries of ``kernels`` (torch.library has no public way to drop a
    registration, and overriding one makes the dispatcher warn)."""

    def __init__(self):
        self.lib: torch.library.Library | None = None
        self.forced: str | None = None
        self.from_env = False  # whether LIFT_BACKEND (not a use_backend call) forced self.forced
        self.kernels: dict[tuple[str, str], Callable] = {}  # (op, device) -> what runs there now
        self.choices: dict[tuple[str, str], tuple[str, str]] = {}  # (op, device) -> (backend, reason)

    def register(self, forced: str | None, from_env: bool) -> None:
        kernels, choices = {}, {}
        for op, reference_kernel in OPS.items():
            for dev in devices():
                try:
                    backend, why = choose(op, dev, forced, from_env)
                    if backend == "native" and native.pending():
                        fn, why = self._first_call(op, dev), f"{why}; lift_kernels._C compiles on its first call"
                    else:
                        fn = _kernel(op, backend, dev) or reference_kernel
                except BackendUnavailableError as exc:
                    backend, why, fn = "error", str(exc), _unavailable(exc)
                kernels[op, dev], choices[op, dev] = fn, (backend, why)
        self.kernels, self.forced, self.from_env, self.choices = kernels, forced, from_env, choices
        if self.lib is None:
            self.lib = torch.library.Library(NAMESPACE, "IMPL")
            for op, dev in kernels:
                self.lib.impl(op, self._dispatcher(op, dev), _DISPATCH_KEYS[dev])

    def _first_call(self, op: str, dev: str) -> Callable:
        """Stands for a native kernel until _C is built on first use: builds it (or loads the cached
        build), registers what runs now (native, or the other backends where the build failed), runs it."""
        def kernel(*args, **kwargs):
            load_native()
            return self.kernels[op, dev](*args, **kwargs)
        return kernel

    def _dispatcher(self, op: str, dev: str) -> Callable:
        def kernel(*args, **kwargs):
            return self.kernels[op, dev](*args, **kwargs)
        kernel.__name__ = f"{op}_{dev}"
        return kernel


_REGISTRY = _Registry()


class use_backend:  # noqa: N801  (used like a function, as torch.set_grad_enabled)
    """Registers the kernels of backend ``name`` (None: the defaults; no argument: LIFT_BACKEND's
    current value) for every op and device. As a context manager, restores the previous choice on exit."""

    def __init__(self, name: str | None | object = _FROM_ENV):
        from_env = name is _FROM_ENV
        forced = parse(os.environ.get("LIFT_BACKEND") if from_env else name)
        self.previous = _REGISTRY.forced, _REGISTRY.from_env
        _REGISTRY.register(forced, from_env)

    def __enter__(self) -> use_backend:
        return self

    def __exit__(self, *exc) -> None:
        _REGISTRY.register(*self.previous)


def load_native(verbose: bool = False, retry: bool = False) -> bool:
    """Builds lift_kernels._C now where it compiles on first use (or loads its cached build), then
    registers the kernels chosen now; True if _C is loaded. The first native kernel call does this."""
    loaded = native.load(verbose=verbose, retry=retry)
    _REGISTRY.register(_REGISTRY.forced, _REGISTRY.from_env)
    return loaded


def forced_backend() -> str | None:
    """The backend forced now (by LIFT_BACKEND or use_backend), or None."""
    return _REGISTRY.forced


def forced_origin() -> str | None:
    """What forced the backend now: "LIFT_BACKEND=<name>" or "use_backend('<name>')"; None if none is."""
    return forced_by(_REGISTRY.forced, _REGISTRY.from_env)


def chosen(op: str, device_type: str) -> tuple[str, str]:
    """(backend, reason) registered now for ``op`` on ``device_type``; backend is "error" where a forced
    backend cannot run (the reason says why)."""
    return _REGISTRY.choices[op, device_type]
