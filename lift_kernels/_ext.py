"""Loads the compiled extension ``lift_kernels._C``: the one installed with the package, else the one
compiled on first use for the torch that imports it (lift_kernels/_jit.py); one clear warning where
neither can be had.

At import only the installed _C is tried. Where it is missing (a wheel built by plain `pip install .`)
or does not load (built for another torch) and the sources are at hand, the first-use build is
*pending*: the first call of a native kernel runs ``load()`` (through lift_kernels.ops.backends), so
`import lift_kernels` stays fast and quiet.
"""
from __future__ import annotations

import importlib.util
import os
import threading
import warnings

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

from . import _jit

EXT = None
EXT_ERROR: str | None = None
SOURCE: str | None = None  # "install" (built with the package) or "jit-cache" (compiled on first use)
PATH: str | None = None  # the file _C was loaded from
_pending: str | None = None  # why the first-use build will run (None: it will not)
_load_lock = threading.Lock()


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


def pending() -> bool:
    """Whether _C will be compiled (or loaded from the first-use cache) by the next ``load()``."""
    return _pending is not None


def load(verbose: bool = False, retry: bool = False) -> bool:
    """Runs the pending first-use build (or loads its cached result); True if _C is loaded. Where the
    build fails, warns once, naming the cause and the fix, and the ops keep their other backends."""
    global EXT, EXT_ERROR, SOURCE, PATH, _pending
    with _load_lock:
        if _pending is not None:
            try:
                EXT, library = _jit.load(_pending, verbose=verbose, retry=retry)
                SOURCE, PATH = "jit-cache", str(library)
            except Exception as exc:  # noqa: BLE001  (whatever stops the build, training goes on without it)
                EXT_ERROR = f"lift_kernels._C could not be built on first use: {exc}"
                warnings.warn(
                    f"{EXT_ERROR}. Using the pure-torch reference ops (and Triton where it runs). To fix: install "
                    "a C++ compiler and the Python headers (e.g. `apt-get install g++ python3-dev`), then run "
                    "`python -m lift_kernels.build`, which retries and prints the compiler's output; or install "
                    "with `pip install --no-build-isolation .` to compile at install time. LIFT_NO_NATIVE=1 "
                    "skips the native kernels without this warning.", RuntimeWarning, stacklevel=1)
            _pending = None
    return EXT is not None


def describe() -> dict:
    """For lk.info(): where _C comes from, or why it is not loaded, or when it will be built."""
    facts = {"loaded": EXT is not None, "source": SOURCE, "path": PATH, "error": EXT_ERROR}
    if EXT is not None and hasattr(EXT, "openmp_version"):
        # _OPENMP of the build (0: without OpenMP, the CPU kernels run on one thread) and the threads
        # at::parallel_for starts from _C now (torch.get_num_threads() where built with OpenMP)
        facts["openmp_version"] = EXT.openmp_version()
        facts["parallel_for_threads"] = EXT.parallel_for_threads()
    if _pending is not None:
        facts["pending"] = (f"compiled on the first call of a native kernel ({_pending}), cached under "
                            f"{_jit.cache_root()}; `python -m lift_kernels.build` compiles it now")
    return facts


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
        SOURCE, PATH = "install", EXT.__file__
    except ImportError as exc:  # not built (a wheel built without torch), or built against another torch
        shadowed = _installed_elsewhere()
        if _jit.csrc_dir() is not None and not shadowed:
            missing = importlib.util.find_spec(f"{__package__}._C") is None
            _pending = "first use" if missing else f"first use; the installed one does not load: {exc}"
        else:
            EXT_ERROR = f"lift_kernels._C could not be loaded ({exc})"
            fix = (f"this is the source folder {os.path.dirname(__file__)}, imported because the working "
                   f"directory is the repository root; it hides the installed package at {shadowed}. Run from "
                   "another directory, or install in place with `pip install --no-build-isolation -e .`"
                   if shadowed else "Reinstall with `pip install --no-build-isolation -e .` to build the extension")
            warnings.warn(f"{EXT_ERROR}; using the pure-torch reference ops. {fix}.", RuntimeWarning, stacklevel=2)
