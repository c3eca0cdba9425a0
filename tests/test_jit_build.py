"""`pip install .` as users type it (issue 18 item 8).

pip builds the wheel in an isolated environment without torch: it must come out pure Python with the
C++ sources inside, and lift_kernels._C is then compiled on first use for the torch that imports it
(lift_kernels/_jit.py), cached, built once by processes that start together, and where it cannot be
built the ops keep their other backends with one warning that names the fix.

The processes here import that very wheel, installed with `pip install --target` into a folder put
first on their path. The compile itself (~2 min on 2 cores) runs only with LIFT_TEST_JIT_COMPILE=1:
.ci/run's `pipplain` part runs it once, in a fresh venv after a plain `pip install .`.
"""
from __future__ import annotations

import json
import os
import shutil
import site as sitepackages
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from lift_kernels import _build_config as config
from lift_kernels import _jit

ROOT = Path(__file__).resolve().parent.parent
BUILDING = "lift_kernels: building lift_kernels._C"  # the line a build prints (waiting ranks print another)
WARNING_FIX = ("apt-get install g++", "python -m lift_kernels.build", "pip install --no-build-isolation .")

# The first native kernel call of a process, checked against the reference op.
FIRST_USE = """
import json, time, warnings
warnings.simplefilter("always")
import torch
import lift_kernels as lk
from lift_kernels.ops import use_backend
old, new = torch.arange(0, 3000, 3, dtype=torch.int32), torch.arange(0, 3000, 5, dtype=torch.int32)
states = [torch.randn(old.numel()), torch.rand(old.numel())]
start = time.monotonic()
with warnings.catch_warnings(record=True) as caught:
    got = lk.remap_state(old, new, states)  # a native kernel: _C is built, or loaded from the cache, here
    again = lk.remap_state(old, new, states)
seconds = time.monotonic() - start
with use_backend("reference"):
    want = lk.remap_state(old, new, states)
info = lk.info()
print(json.dumps({"seconds": seconds, "same": all(torch.equal(a, b) and torch.equal(c, b) for a, b, c in
                                                  zip(got, want, again)),
                  "extension": info["extension"], "remap_state": info["ops"]["remap_state"]["cpu"],
                  "file": lk.__file__, "warnings": [str(w.message) for w in caught]}))
"""


def _tree_copy(dest: Path) -> Path:
    """The files a fresh clone of this checkout has (tracked, and new files not ignored)."""
    try:
        names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the wheel is built from a copy of the checkout's files")
    for name in names:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def plain_wheel(tmp_path_factory) -> tuple[Path, str]:
    """(the wheel, pip's output) of `pip wheel --no-deps .`, with pip's build isolation, from a copy of
    the checkout in which a stale in-place build of _C lies (it must not ship)."""
    tmp = tmp_path_factory.mktemp("plain")
    src = _tree_copy(tmp / "src")
    (src / "lift_kernels" / f"_C.{sys.implementation.cache_tag}-stale.so").write_text("not a library")
    env = {k: v for k, v in os.environ.items() if k != "PIP_NO_BUILD_ISOLATION"}
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", str(src), "-w", str(tmp / "dist")],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, f"pip wheel failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    wheels = list((tmp / "dist").glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0], out.stdout + out.stderr


@pytest.fixture(scope="module")
def plain_python(plain_wheel, tmp_path_factory) -> Path:
    """The Python of a new venv with that wheel installed, whose other packages (torch) are this
    interpreter's: a .pth file adds this one's site-packages, without running its .pth files (an
    editable install of the checkout there would otherwise lend the wheel its compiled _C)."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "dev_packages.pth").write_text("\n".join(sitepackages.getsitepackages()) + "\n")
    out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                          str(plain_wheel[0])], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return python


def _run(python: Path, cache: Path, code: str = FIRST_USE, **env) -> subprocess.Popen:
    return subprocess.Popen([python, "-c", code], cwd=python.parent, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_env(cache, **env))


def _env(cache: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LIFT_BACKEND", "LIFT_NO_NATIVE", "PYTHONPATH")}
    return {**env, "LIFT_EXTENSION_DIR": str(cache), **extra}


def _facts(proc: subprocess.Popen) -> tuple[dict, str]:
    stdout, stderr = proc.communicate(timeout=1800)
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1]), stderr


def test_the_plain_wheel_is_pure_python_and_carries_the_sources(plain_wheel):
    wheel, log = plain_wheel
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    names = set(zipfile.ZipFile(wheel).namelist())
    assert not [n for n in names if n.endswith((".so", ".pyd"))], "a pure wheel shipped a compiled library"
    sources = config.source_files(str(ROOT / "csrc"))
    assert len(sources) >= 10 and {"ops.cpp", "kernels.h", "cpu/sparse_adamw_step_cpu.cpp"} <= set(sources)
    assert not {f"lift_kernels/_csrc/{s}" for s in sources} - names, "the wheel lacks sources"
    assert {"lift_kernels/_jit.py", "lift_kernels/_build_config.py", "lift_kernels/build.py",
            "lift_kernels/triton_kernels/sparse_adamw_step.py"} <= names
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "Requires-Dist: ninja" in metadata and "Requires-Dist: torch>=2.11" in metadata
    # pip -v shows what setup.py said: the build is deferred, and how to compile at install time
    assert "building a pure-Python wheel" in log and "pip install --no-build-isolation ." in log


def test_the_cache_folder_follows_the_environment_and_every_input(monkeypatch, tmp_path):
    for var in ("LIFT_EXTENSION_DIR", "TORCH_EXTENSIONS_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _jit.cache_root() == tmp_path / "xdg" / "torch_extensions" / "lift_kernels"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch-ext"))
    assert _jit.cache_root() == tmp_path / "torch-ext" / "lift_kernels"
    monkeypatch.setenv("LIFT_EXTENSION_DIR", str(tmp_path / "mine"))
    assert _jit.cache_root() == tmp_path / "mine"

    base = _jit.plan().folder
    assert base.parent == tmp_path / "mine" and f"torch{torch.__version__}" in base.name
    assert _jit.plan().folder == base  # the same inputs, the same build
    folders = {base}

    def changed() -> Path:
        folder = _jit.plan().folder
        assert folder not in folders, "an input of the build did not change its cache folder"
        folders.add(folder)
        return folder

    with monkeypatch.context() as patch:
        patch.setattr(config, "CXX_FLAGS", [*config.CXX_FLAGS, "-fopenmp"])  # a new flag rebuilds
        changed()
    with monkeypatch.context() as patch:
        patch.setattr(config, "LINK_FLAGS", [*config.LINK_FLAGS, "-lgomp"])
        changed()
    with monkeypatch.context() as patch:
        patch.setattr(torch, "__version__", "2.99.0")
        assert "torch2.99.0" in changed().name
    with monkeypatch.context() as patch:
        patch.setenv("CXX", "/nonexistent/g++")
        changed()
    with monkeypatch.context() as patch:
        csrc = tmp_path / "csrc"
        shutil.copytree(ROOT / "csrc", csrc)
        patch.setattr(_jit, "csrc_dir", lambda: csrc)
        assert _jit.plan().folder == base  # a copy of the same sources: the same build
        (csrc / "kernels.h").write_text((csrc / "kernels.h").read_text() + "\n// edited\n")
        changed()


def test_a_failed_build_falls_back_with_one_warning_that_names_the_fix(plain_python, tmp_path):
    cache = tmp_path / "ext"
    first, stderr = _facts(_run(plain_python, cache, CXX="/nonexistent/g++"))
    assert ROOT not in Path(first["file"]).parents  # the wheel's package, not the checkout
    assert BUILDING in stderr
    assert first["same"] and first["remap_state"]["backend"] == "reference"
    assert not first["extension"]["loaded"] and "/nonexistent/g++: not found" in first["extension"]["error"]
    assert len(first["warnings"]) == 1, first["warnings"]  # two calls, one warning
    message = first["warnings"][0]
    assert "/nonexistent/g++: not found" in message and all(fix in message for fix in WARNING_FIX), message
    log = Path(message.split("full log: ")[1].split(")")[0])
    assert log.parent.parent == cache and "/nonexistent/g++" in log.read_text()

    # The next process (another DDP rank, the next run) reads the record instead of failing again.
    again, stderr = _facts(_run(plain_python, cache, CXX="/nonexistent/g++"))
    assert BUILDING not in stderr and again["same"] and len(again["warnings"]) == 1
    assert "failed before" in again["warnings"][0] and all(fix in again["warnings"][0] for fix in WARNING_FIX)

    # Forced, the native backend raises with the cause instead of falling back.
    forced = _run(plain_python, cache, CXX="/nonexistent/g++", LIFT_BACKEND="native")
    stdout, stderr = forced.communicate(timeout=600)
    assert forced.returncode != 0 and "BackendUnavailableError" in stderr and "not found" in stderr

    # `python -m lift_kernels.build` retries (and fails the same way here), exit status 1.
    build = subprocess.run([plain_python, "-m", "lift_kernels.build", "--quiet"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=600, env=_env(cache, CXX="/nonexistent/g++"))
    assert build.returncode == 1 and BUILDING in build.stderr, build.stderr[-2000:]
    assert "/nonexistent/g++: not found" in build.stdout


def test_native_off_means_pure_python_with_nothing_built(plain_python, tmp_path):
    facts, stderr = _facts(_run(plain_python, tmp_path / "ext", LIFT_NO_NATIVE="1"))
    assert facts["same"] and facts["remap_state"]["backend"] == "reference" and not facts["warnings"]
    assert BUILDING not in stderr and not (tmp_path / "ext").exists()


def test_import_builds_nothing(plain_python, tmp_path):
    code = ("import json, lift_kernels as lk; e = lk.info()['extension']; "
            "print(json.dumps([e['loaded'], e.get('pending'), lk.info()['ops']['remap_state']['cpu']]))")
    facts, stderr = _facts(_run(plain_python, tmp_path / "ext", code=code))
    loaded, pending, remap = facts
    assert not loaded and "first call of a native kernel" in pending and str(tmp_path / "ext") in pending
    assert remap["backend"] == "native" and "compiles on its first call" in remap["why"]
    assert not stderr.strip() and not (tmp_path / "ext").exists()


@pytest.mark.skipif(os.environ.get("LIFT_TEST_JIT_COMPILE") != "1",
                    reason="compiles lift_kernels._C (~2 min on 2 cores): LIFT_TEST_JIT_COMPILE=1 runs it "
                           "(.ci/run's pipplain part does)")
def test_first_use_compiles_once_for_two_processes_then_the_cache_is_reused(plain_python, tmp_path):
    """Into LIFT_EXTENSION_DIR where it is set (pipplain's later tests then load this build), else tmp."""
    cache = Path(os.environ.get("LIFT_EXTENSION_DIR") or tmp_path / "ext")
    assert not list(cache.glob(f"*/{_jit.BUILT}")), f"{cache} already holds a build: the test needs a first use"
    procs = [_run(plain_python, cache) for _ in range(2)]  # two ranks starting together
    (a, a_err), (b, b_err) = (_facts(p) for p in procs)
    assert [a_err.count(BUILDING), b_err.count(BUILDING)] in ([1, 0], [0, 1]), (a_err, b_err)
    assert "another process is building lift_kernels._C" in (b_err if BUILDING in a_err else a_err)
    for facts in (a, b):
        assert facts["same"] and not facts["warnings"], facts
        assert facts["extension"]["source"] == "jit-cache" and facts["remap_state"]["backend"] == "native"
    library = Path(a["extension"]["path"])
    assert library == Path(b["extension"]["path"]) and library.parent.parent == cache
    built = library.stat().st_mtime_ns

    start = time.monotonic()
    c, c_err = _facts(_run(plain_python, cache))
    assert "lift_kernels" not in c_err and c["same"] and c["extension"]["path"] == str(library), c_err
    assert c["seconds"] < 20 and library.stat().st_mtime_ns == built, "the cached build was compiled again"
    print(f"first use: {max(a['seconds'], b['seconds']):.0f} s; from the cache: {c['seconds']:.2f} s "
          f"(process {time.monotonic() - start:.1f} s)")
