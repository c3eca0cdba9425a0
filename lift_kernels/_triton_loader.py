"""Finds the Triton kernel sources.

They live in the repository's top-level ``triton/`` folder, which setup.py installs as the
subpackage ``lift_kernels.triton_kernels``. That folder has no ``__init__.py`` on purpose: running
Python from the repository root must never shadow the real ``triton`` package. In a source checkout
without an install, the modules are loaded from the folder by path.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType


def triton_usable() -> tuple[bool, str]:
    """Whether Triton kernels can run here, and why not."""
    try:
        import triton
    except ImportError as exc:
        return False, f"triton is not installed ({exc})"
    if getattr(triton, "__file__", None) is None or not hasattr(triton, "jit"):
        # A folder named triton/ without __init__.py on sys.path (e.g. this repository's root as the
        # working directory of `python -m`/`-c`) imports as an empty namespace package.
        where = list(getattr(triton, "__path__", []))
        return False, (f"`import triton` found a folder, not the Triton package ({where}); run from "
                       "another directory or install triton")
    return True, f"triton {getattr(triton, '__version__', '?')} importable"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def load_kernel_module(name: str) -> ModuleType:
    full = f"lift_kernels.triton_kernels.{name}"
    if full in sys.modules:
        return sys.modules[full]
    try:
        return importlib.import_module(full)
    except ModuleNotFoundError:
        checkout = Path(__file__).resolve().parent.parent
        src = checkout / "triton" / f"{name}.py"
        if not (checkout / "setup.py").exists() or not src.exists():
            raise
        spec = importlib.util.spec_from_file_location(full, src)
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
        return module
