"""The kernel library stands apart from the application (issue 11): `import lift_kernels` loads only
what the optimizer needs, no module of the library imports the app, and the app's modules import one
another without a circle."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY, APP = ROOT / "lift_kernels", ROOT / "lift_finetune"

# Needed by the app, the HF integration, save_delta or a quantized base (bitsandbytes), never by `import lift_kernels`.
# torch.utils.cpp_extension (it imports setuptools) only for the first-use build of _C, on a native kernel's first call.
HEAVY = ("lift_finetune", "bitsandbytes", "safetensors", "matplotlib", "tqdm", "transformers", "peft", "accelerate",
         "gguf", "lift_kernels.integrations", "torch.utils.cpp_extension", "setuptools", "filelock", "ninja")
TORCH_IMPORTS = {"tqdm"}  # `import torch` itself loads it (torch 2.13)

_PROBE = """
import json, sys
import torch
before = set(sys.modules)
import lift_kernels
print(json.dumps({"before": sorted(before), "after": sorted(sys.modules), "file": lift_kernels.__file__}))
"""


def _imported(module: str, names: set[str]) -> bool:
    return any(n == module or n.startswith(module + ".") for n in names)


def test_import_lift_kernels_loads_nothing_heavy():
    """What `import lift_kernels` adds to what `import torch` already loaded (torch itself imports
    tqdm on some versions: that one is torch's, not ours)."""
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT / "tests", capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(facts["file"]).resolve().parent == LIBRARY
    before, after = set(facts["before"]), set(facts["after"])
    added = after - before
    assert {"lift_kernels", "lift_kernels.distributed"} <= added  # the real import ran, here
    loaded = [m for m in HEAVY if _imported(m, added)]
    assert not loaded, f"`import lift_kernels` imported {loaded}"
    assert not [m for m in HEAVY if m not in TORCH_IMPORTS and _imported(m, after)]  # nor through torch


def _imports(path: Path) -> set[str]:
    """Absolute names of what the module at ``path`` imports, anywhere in it (lazy imports too)."""
    here = path.relative_to(ROOT).parts[:-1]  # the package the module is in
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = list(here[:len(here) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)  # `from . import x` imports x
    return names


def test_the_library_never_imports_the_app():
    offenders = {str(p.relative_to(ROOT)): sorted(n for n in _imports(p)
                                                  if _imported("lift_finetune", {n}) or n.startswith("bench"))
                 for p in LIBRARY.rglob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


def test_the_app_modules_import_without_a_circle():
    """cli -> run -> ... one way (the run length defaults used to make cli <-> run a circle)."""
    modules = {p.stem: p for p in APP.glob("*.py") if p.stem not in ("__init__", "__main__")}
    graph = {m: {n.split(".")[1] for n in _imports(p)
                 if n.startswith("lift_finetune.") and n.split(".")[1] in modules and n.split(".")[1] != m}
             for m, p in modules.items()}
    assert graph["cli"] >= {"run"} and "cli" not in graph["run"]
    done, path = set(), []

    def visit(m):
        assert m not in path, f"import circle: {' -> '.join(path[path.index(m):] + [m])}"
        if m in done:
            return
        path.append(m)
        for n in sorted(graph[m]):
            visit(n)
        path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)
