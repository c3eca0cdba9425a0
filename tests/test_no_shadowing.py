"""From the repository root nothing imports the top-level triton/ folder as `triton`, and
`lift_kernels` is the built package (with its compiled extension).

The repository root holds triton/ (kernel sources, no __init__.py) and lift_kernels/ (the sources).
`python -m` and `python -c` put the working directory first on sys.path; without a real Triton,
triton/ then imports as an empty namespace package (transformers takes it for Triton and its model
imports fail), and a non-editable install is hidden by the source folder.
"""
import json
import subprocess
import sys
import types
from pathlib import Path

from lift_kernels import _triton_loader
from lift_finetune import cli

ROOT = Path(__file__).resolve().parent.parent

_PROBE = """
import importlib.util, json, sys
spec = importlib.util.find_spec("triton")
import lift_kernels, lift_kernels._ext as ext
from lift_kernels import _triton_loader
print(json.dumps({
    "triton_usable": _triton_loader.triton_usable()[0],
    "path": sys.path,
    "triton_origin": None if spec is None else spec.origin,
    "triton_locations": None if spec is None else list(spec.submodule_search_locations or []),
    "lift_kernels": lift_kernels.__file__,
    "extension": ext.EXT is not None,
    "extension_error": ext.EXT_ERROR,
}))
"""


def _probe(prefix: str = "") -> dict:
    out = subprocess.run([sys.executable, "-c", prefix + _PROBE], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _is_repo_triton(facts: dict) -> bool:
    return facts["triton_origin"] is None and any(
        Path(p).resolve() == ROOT / "triton" for p in facts["triton_locations"] or [])


def test_lift_finetune_restarts_without_the_working_directory():
    cmd = cli.reexec_command(["--max-steps", "1"])
    assert cmd[:2] == [sys.executable, "-c"] and cmd[2].startswith(cli._SAFE_PATH) and cmd[3:] == ["--max-steps", "1"]
    facts = _probe(cli._SAFE_PATH)
    assert "" not in facts["path"] and str(ROOT) not in facts["path"], facts["path"]
    assert not _is_repo_triton(facts), f"triton resolved to the repository's folder: {facts}"
    assert facts["extension"], f"lift_kernels without its extension: {facts}"


def test_the_restart_command_is_what_main_executes(monkeypatch):
    seen = []
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(cli.os, "execv", lambda exe, args: seen.append((exe, args)))
    cli._reexec_with_passive_openmp(["--rank", "8"])
    assert seen == [(sys.executable, cli.reexec_command(["--rank", "8"]))]


def test_python_c_from_the_root_imports_the_built_package():
    """The README installs in place (pip install -e), so the source folder is the built package."""
    facts = _probe()
    assert Path(facts["lift_kernels"]).resolve().parent == ROOT / "lift_kernels"
    assert facts["extension"], f"lift_kernels from the repository root has no _C: {facts['extension_error']}"
    if _real_triton_installed():
        # A regular package beats a namespace portion wherever it is on sys.path.
        assert not _is_repo_triton(facts) and facts["triton_usable"], facts
    else:
        # Python itself resolves `import triton` to the folder here (cwd first, nothing else named
        # triton); lift_kernels must not take it for Triton.
        assert _is_repo_triton(facts) and not facts["triton_usable"], facts


def _real_triton_installed() -> bool:
    from importlib import metadata

    try:
        metadata.distribution("triton")
    except metadata.PackageNotFoundError:
        return False
    return True


def test_a_triton_folder_is_not_taken_for_triton(monkeypatch):
    folder = types.ModuleType("triton")
    folder.__path__ = [str(ROOT / "triton")]  # what `import triton` gives for the bare folder
    folder.__file__ = None
    monkeypatch.setitem(sys.modules, "triton", folder)
    usable, why = _triton_loader.triton_usable()
    assert not usable and "folder" in why and str(ROOT / "triton") in why
