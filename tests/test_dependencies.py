"""Dependencies point one way: distributed -> optim -> ops -> kernels, and the library never imports
the app (``lift_finetune``). Checked with ``ast`` over lift_kernels/: every import statement,
including those inside functions, with relative imports resolved, and string imports
(``importlib.import_module("...")``, ``__import__("...")``)."""
from __future__ import annotations

import ast
import textwrap
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lift_kernels"

# Who may import what. A module's layer is the first rule whose prefix its name starts with.
# The top-level package (lift_kernels/__init__.py) assembles the public API and may import anything.
UPPER = ("lift_kernels.distributed", "lift_kernels.integrations")
# The references are the bottom layer: the oracle the ops and kernels are tested against.
BOTTOM = "lift_kernels.reference"


def _forbidden(module: str) -> list[tuple[str, str]]:
    """(imported prefix, reason) pairs ``module`` must not import."""
    rules = [("lift_finetune", "the library must not import the app")]
    if module == "lift_kernels" or module.startswith(UPPER):
        return rules
    rules.append(("lift_kernels.distributed",
                  "optim, ops, reference and the kernels must not import lift_kernels.distributed "
                  "(it plugs into the optimizer as a strategy: optim/strategy.py)"))
    if not module.startswith("lift_kernels.optim"):
        rules.append(("lift_kernels.optim", "ops, reference and the kernels must not import the optimizer"))
    if module.startswith(BOTTOM):
        rules.append(("lift_kernels.ops", "the references must not import the ops they are the oracle of"))
    return rules


def _module_name(path: Path, root: Path) -> tuple[str, bool]:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    if level == 0:
        return name or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _string_import(node: ast.Call) -> tuple[str, str | None] | None:
    """(name, package) of importlib.import_module("x", package) or __import__("x")."""
    func = node.func
    is_import_module = (isinstance(func, ast.Attribute) and func.attr == "import_module") or \
        (isinstance(func, ast.Name) and func.id in ("import_module", "__import__"))
    if not is_import_module or not node.args or not isinstance(node.args[0], ast.Constant) \
            or not isinstance(node.args[0].value, str):
        return None
    package = None
    if len(node.args) > 1 and isinstance(node.args[1], ast.Constant):
        package = node.args[1].value
    for kw in node.keywords:
        if kw.arg == "package" and isinstance(kw.value, ast.Constant):
            package = kw.value.value
    return node.args[0].value, package


def imports_of(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``."""
    module, is_package = _module_name(path, root)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node.level, node.module)
            # `from . import distributed` names the submodule in the alias (the longest name first)
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
            found.append((node.lineno, target))
        elif isinstance(node, ast.Call) and (string := _string_import(node)) is not None:
            name, package = string
            if name.startswith(".") and package:  # relative to ``package``
                rest = name.lstrip(".")
                name = _resolve(package, True, len(name) - len(rest), rest or None)
            found.append((node.lineno, name))
    return found


def violations(root: Path) -> list[str]:
    """``file:line: module imports target (reason)`` for every import that breaks the layering."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        module, _ = _module_name(path, root)
        rules = _forbidden(module)
        for line, target in imports_of(path, root):
            for prefix, reason in rules:
                where = f"{path.relative_to(root.parent)}:{line}"
                if (target == prefix or target.startswith(prefix + ".")) and (where, prefix) not in out:
                    out[where, prefix] = f"{where}: {module} imports {target} ({reason})"
    return sorted(out.values())


def test_dependencies_point_one_way():
    found = violations(PACKAGE)
    assert not found, "imports against the layering distributed -> optim -> ops -> kernels:\n" + "\n".join(found)


def test_the_check_finds_planted_violations(tmp_path):
    root = tmp_path / "lift_kernels"
    files = {
        "__init__.py": "from . import distributed, optim\n",
        "ops.py": "import importlib\n\ndef f():\n    return importlib.import_module('lift_kernels.distributed.route')\n",
        "reference/__init__.py": "",
        "reference/select.py": "from ..optim import selection\n",
        "reference/remap.py": "from ..ops import remap_state\n",
        "optim/__init__.py": "",
        "optim/fine.py": "from .strategy import LocalStrategy\nfrom ..reference import topk_flat_indices\n",
        "optim/lazy.py": "def later():\n    from ..distributed import placement\n    return placement\n",
        "optim/by_alias.py": "from .. import distributed\n",
        "optim/by_package.py": "import importlib\nm = importlib.import_module('.distributed', 'lift_kernels')\n",
        "optim/app.py": "import lift_finetune.cli\n",
        "distributed/__init__.py": "from ..optim import strategy\nfrom .. import ops\n",
        "backend.py": "__import__('lift_kernels.optim')\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    found = violations(root)
    located = {v.split(": ")[0] for v in found}
    assert located == {"lift_kernels/ops.py:4", "lift_kernels/reference/select.py:1", "lift_kernels/optim/lazy.py:2",
                       "lift_kernels/optim/by_alias.py:1", "lift_kernels/optim/by_package.py:2",
                       "lift_kernels/optim/app.py:1", "lift_kernels/backend.py:1",
                       "lift_kernels/reference/remap.py:1"}, found
    assert any("optim/lazy.py:2: lift_kernels.optim.lazy imports lift_kernels.distributed.placement" in v
               for v in found)
    assert any("the library must not import the app" in v for v in found)
