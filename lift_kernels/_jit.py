"""Compiles lift_kernels._C on first use, for the torch that imports it, into a cache.

`pip install .` and `pip install git+...` build the wheel in an isolated environment without torch,
so that wheel carries the C++/CUDA sources (lift_kernels/_csrc) instead of a compiled _C. The first
native kernel call compiles them here with torch.utils.cpp_extension (ninja), as DeepSpeed's op
builder does, into a folder keyed by everything the binary depends on: torch's version and CUDA
build, the CUDA architectures, the Python ABI, the compiler, the flags and the sources. Later
processes import that build at once (no compiler needed). Two processes (DDP ranks) that start
together build once: the other waits on a file lock. A failed build is recorded there too, so ranks
and later runs do not each spend minutes failing again; `python -m lift_kernels.build` retries.

Nothing here runs at `import lift_kernels`; torch.utils.cpp_extension (which imports setuptools) is
imported only to compile, or for a CUDA torch to find the toolkit.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from . import _build_config as config

NAME = "_C"  # the module name the sources are compiled as (TORCH_EXTENSION_NAME); _C.so in the folder
BUILT, FAILED, LOG = "built.json", "failed.json", "build.log"
# Rough compile cost in CPU seconds (g++ 12 on a 2-core x86 machine; the CUDA kernels cost more),
# for the estimate the log line gives.
COMPILE_CPU_SECONDS = {"cpu": 240, "cuda": 600}


class BuildError(RuntimeError):
    """The first-use build failed (now, or earlier with the same key: see ``FAILED``)."""


def csrc_dir() -> Path | None:
    """The C++ sources: lift_kernels/_csrc in an installed wheel, csrc/ in a source checkout."""
    package = Path(__file__).resolve().parent
    if (package / "_csrc" / "ops.cpp").is_file():
        return package / "_csrc"
    checkout = package.parent  # a csrc/ beside site-packages' lift_kernels is not ours: ask for setup.py
    if (checkout / "csrc" / "ops.cpp").is_file() and (checkout / "setup.py").is_file():
        return checkout / "csrc"
    return None


def cache_root() -> Path:
    """LIFT_EXTENSION_DIR, else TORCH_EXTENSIONS_DIR/lift_kernels, else torch's default root for JIT
    extensions (~/.cache/torch_extensions) + lift_kernels."""
    if os.environ.get("LIFT_EXTENSION_DIR"):
        return Path(os.environ["LIFT_EXTENSION_DIR"]).expanduser()
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]).expanduser() / "lift_kernels"
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "torch_extensions" / "lift_kernels"


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return (out.stdout or out.stderr).strip().splitlines()[0] if out.returncode == 0 else "failed"
    except (OSError, IndexError, subprocess.SubprocessError):
        return "not found"


def _compiler() -> str:
    """The C++ compiler torch.utils.cpp_extension will call (CXX, else c++), and its version."""
    cxx = os.environ.get("CXX", "c++")
    path = shutil.which(cxx)
    return f"{cxx} = {path}: {_first_line([path, '--version']) if path else 'not found'}"


def _cuda() -> tuple[bool, str, str]:
    """(build the CUDA kernels?, arch list, nvcc) for this process. CUDA kernels are built only where
    they can run or where the architectures are given: for the GPUs this process sees, or for
    TORCH_CUDA_ARCH_LIST; without either, the CPU kernels only (a later process with a GPU gets its
    own build, under another key)."""
    if torch.version.cuda is None or os.environ.get("LIFT_NO_CUDA", "0") == "1":
        return False, "", ""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    if not archs and torch.cuda.is_available():
        archs = ";".join(sorted({"{}.{}".format(*torch.cuda.get_device_capability(i))
                                 for i in range(torch.cuda.device_count())}))
    if not archs:
        return False, "", ""
    from torch.utils.cpp_extension import CUDA_HOME  # finds the toolkit as the build will

    if not config.cuda_wanted(torch, CUDA_HOME):
        return False, "", ""
    return True, archs, _first_line([os.path.join(CUDA_HOME, "bin", "nvcc"), "--version"]) + f" ({CUDA_HOME})"


@dataclass
class Plan:
    """What to compile, with what, and where the build for this key lives."""
    csrc: Path
    with_cuda: bool
    facts: dict  # everything the binary depends on
    folder: Path  # cache root / a name made of the main facts and a hash of them all

    @property
    def library(self) -> Path:
        return self.folder / f"{NAME}.so"

    @property
    def lock(self) -> Path:
        return self.folder.with_name(self.folder.name + ".lock")

    def sources(self) -> list[str]:
        return config.sources(str(self.csrc), self.with_cuda)

    def cflags(self) -> tuple[list[str], list[str]]:
        defines = [f"-D{k}={v}" for k, v in config.CUDA_DEFINES.items()] if self.with_cuda else []
        return config.CXX_FLAGS + self.facts["openmp"][0] + defines, config.NVCC_FLAGS + defines

    def ldflags(self) -> list[str]:
        return list(config.LINK_FLAGS) + self.facts["openmp"][1]


def plan() -> Plan:
    csrc = csrc_dir()
    if csrc is None:
        raise BuildError("lift_kernels was installed without its C++ sources (LIFT_NO_NATIVE=1 when it was built)")
    with_cuda, archs, nvcc = _cuda()
    omp_cxx, omp_link, omp_note = config.openmp(os.path.join(os.path.dirname(torch.__file__), "lib"))
    digest = hashlib.sha256()
    for rel in config.source_files(str(csrc)):
        digest.update(rel.encode() + b"\0" + (csrc / rel).read_bytes() + b"\0")
    facts = {
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_archs": archs, "nvcc": nvcc,
        "python": f"{sys.implementation.cache_tag} {sysconfig.get_config_var('SOABI')}", "compiler": _compiler(),
        "flags": [config.CXX_FLAGS, config.NVCC_FLAGS, config.LINK_FLAGS, config.CUDA_DEFINES],
        "openmp": [omp_cxx, omp_link, omp_note],
        "sources": digest.hexdigest(),
    }
    key = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
    device = f"cu{torch.version.cuda}-sm{archs.replace(';', '_')}" if with_cuda else "cpu"
    folder = cache_root() / f"torch{torch.__version__}-{sys.implementation.cache_tag}-{device}-{key}"
    return Plan(csrc, with_cuda, facts, folder)


def _cached(p: Plan) -> ModuleType | None:
    """The build of this key, if one finished and still loads (a damaged one is built again)."""
    if not ((p.folder / BUILT).exists() and p.library.exists()):
        return None
    spec = importlib.util.spec_from_file_location(NAME, p.library)
    try:
        module = importlib.util.module_from_spec(spec)  # dlopen
        spec.loader.exec_module(module)
    except (ImportError, OSError):
        return None
    return module


def _cause(log: str) -> str:
    """The line of a failed build's output a user needs first."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for needle in ("error:", "not found", "No such file", "Error", "error"):
        hit = next((line for line in lines if needle in line), None)
        if hit:
            return hit[:300]
    return lines[-1][:300] if lines else "no output"


def _ninja_bin() -> str:
    try:
        import ninja  # the PyPI package (a dependency of lift_kernels)
    except ImportError:
        return ""  # then torch says "Ninja is required to load C++ extensions (pip install ninja ...)"
    return ninja.BIN_DIR


def _compile(p: Plan, why: str, verbose: bool) -> ModuleType:
    from torch.utils import cpp_extension

    p.folder.mkdir(parents=True, exist_ok=True)
    baton = p.folder / "lock"  # torch's own build lock; under our file lock, one left behind is stale
    baton.unlink(missing_ok=True)
    for stale in (BUILT, FAILED, p.library.name):  # ninja keeps the objects; the library is linked anew
        (p.folder / stale).unlink(missing_ok=True)
    sources = p.sources()
    cpu_seconds = COMPILE_CPU_SECONDS["cuda" if p.with_cuda else "cpu"]
    minutes = max(1, round(cpu_seconds / min(os.cpu_count() or 1, len(sources)) / 60))
    print(f"lift_kernels: building lift_kernels._C for torch {torch.__version__} ({why}; about {minutes} min "
          f"on {os.cpu_count()} cores), cached in {p.folder}; {p.facts['openmp'][2]}", file=sys.stderr, flush=True)
    # torch finds ninja on PATH; an unactivated venv's bin, where pip put it, is not on PATH.
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([_ninja_bin(), os.path.dirname(sys.executable), path])
    start = time.monotonic()
    cflags, cuda_cflags = p.cflags()
    try:
        module = cpp_extension.load(NAME, sources, extra_cflags=cflags, extra_cuda_cflags=cuda_cflags,
                                    extra_ldflags=p.ldflags(), build_directory=str(p.folder),
                                    with_cuda=p.with_cuda, verbose=verbose)
    except Exception as exc:
        log = f"{type(exc).__name__}: {exc}"
        (p.folder / LOG).write_text(log)
        record = {**p.facts, "cause": _cause(log), "log": str(p.folder / LOG)}
        (p.folder / FAILED).write_text(json.dumps(record, indent=1))
        raise BuildError(f"compiling lift_kernels._C for torch {torch.__version__} failed ({record['cause']}; "
                         f"full log: {p.folder / LOG})") from exc
    finally:
        os.environ["PATH"] = path
    seconds = round(time.monotonic() - start, 1)
    (p.folder / BUILT).write_text(json.dumps({**p.facts, "seconds": seconds}, indent=1))
    print(f"lift_kernels: built lift_kernels._C in {seconds} s", file=sys.stderr, flush=True)
    return module


def load(why: str = "first use", verbose: bool = False, retry: bool = False) -> tuple[ModuleType, Path]:
    """(_C, its file): the cached build for this key, else compiled now. ``retry`` forgets a failed
    build of the same key. Raises BuildError, naming the cause and the log, where it does not build."""
    import filelock

    p = plan()
    if (module := _cached(p)) is not None:
        return module, p.library
    p.lock.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(p.lock))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        print(f"lift_kernels: another process is building lift_kernels._C in {p.folder}; waiting for it",
              file=sys.stderr, flush=True)
        lock.acquire()
    try:
        if (module := _cached(p)) is not None:  # the other process built it
            return module, p.library
        failed = p.folder / FAILED
        if failed.exists() and not retry:
            record = json.loads(failed.read_text())
            raise BuildError(f"compiling lift_kernels._C for torch {torch.__version__} failed before "
                             f"({record.get('cause')}; full log: {record.get('log')}; record: {failed})")
        return _compile(p, why, verbose), p.library
    finally:
        lock.release()
