"""Loads the compiled extension ``lift_kernels._C`` if it was built, with one clear warning if not."""
from __future__ import annotations

import os
import warnings

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

EXT = None
EXT_ERROR: str | None = None


def _installed_elsewhere() -> str | None:
    """The folder of an installed lift_kernels other than this one, if this one shadows it."""
    from importlib import metadata

    try:
        dist = metadata.distribution("lift_kernels")
    except metadata.PackageNotFoundError:
        return None
    installed = os.path.dirname(os.path.abspath(str(dist.locate_file("lift_kernels/__init__.py"))))
    here = os.path.dirname(os.path.abspath(__file__))
    return installed if installed != here and os.path.isdir(installed) else None


if os.environ.get("LIFT_NO_NATIVE", "0") == "1":
    EXT_ERROR = "native build skipped (LIFT_NO_NATIVE=1 at install time or now)"
else:
    try:
        from . import _C as EXT  # noqa: N811  (its kernels: lift_kernels/ops/native.py registers them)
        if not hasattr(EXT, "lowrank_cpu"):  # loaded, and it has registered the ops itself: no way back
            raise RuntimeError(
                f"{EXT.__file__} is a stale build of lift_kernels._C: it defines the lift_kernels ops itself "
                "(TORCH_LIBRARY), which lift_kernels/ops/library.py now does. Rebuild it with "
                "`pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`).")
    except ImportError as exc:  # not built, or built against another torch
        EXT_ERROR = f"lift_kernels._C could not be loaded ({exc})"
        shadowed = _installed_elsewhere()
        fix = (f"this is the source folder {os.path.dirname(__file__)}, imported because the working "
               f"directory is the repository root; it hides the installed package at {shadowed}. Run from "
               "another directory, or install in place with `pip install --no-build-isolation -e .`"
               if shadowed else "Reinstall with `pip install --no-build-isolation -e .` to build the extension")
        warnings.warn(f"{EXT_ERROR}; using the pure-torch reference ops. {fix}.", RuntimeWarning, stacklevel=2)

