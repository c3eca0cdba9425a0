"""`python -m lift_kernels.info` runs without runpy's warning, and lk.info() says what forced a backend:
LIFT_BACKEND or a use_backend() call (issue 19, item 7)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import lift_kernels as lk
from lift_kernels import ops
from lift_kernels.ops import use_backend

ROOT = Path(__file__).resolve().parents[1]


def _run_info(**env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "LIFT_BACKEND"}
    environ.update(env, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    # -W error: runpy's "found in sys.modules" RuntimeWarning would end the run with a traceback
    return subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "lift_kernels.info"],
                          cwd=ROOT / "tests", capture_output=True, text=True, timeout=300, env=environ)


def test_module_run_prints_json_without_a_warning():
    proc = _run_info()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr, proc.stderr
    facts = json.loads(proc.stdout)
    assert set(facts["ops"]) == set(ops.OPS) and facts["forced_backend"] is None and facts["forced_by"] is None


def test_module_run_names_lift_backend_when_it_forced():
    proc = _run_info(LIFT_BACKEND="reference")
    assert proc.returncode == 0, proc.stderr[-3000:]
    facts = json.loads(proc.stdout)
    assert facts["forced_by"] == "LIFT_BACKEND=reference"
    assert facts["ops"]["remap_state"]["cpu"] == {"backend": "reference", "why": "forced by LIFT_BACKEND=reference"}


def test_use_backend_is_named_as_what_forced_and_not_lift_backend(monkeypatch):
    monkeypatch.delenv("LIFT_BACKEND", raising=False)
    with use_backend("reference"):
        facts = lk.info()
        assert facts["forced_backend"] == "reference" and facts["forced_by"] == "use_backend('reference')"
        assert {facts["ops"][op]["cpu"]["why"] for op in ops.OPS} == {"forced by use_backend('reference')"}
        assert "LIFT_BACKEND" not in json.dumps(facts["ops"])
    assert lk.info()["forced_by"] is None


def test_lift_backend_read_by_use_backend_is_named_and_restored(monkeypatch):
    monkeypatch.setenv("LIFT_BACKEND", "reference")
    with use_backend():
        assert lk.info()["forced_by"] == "LIFT_BACKEND=reference"
        with use_backend("reference"):  # nested: the inner call forced it, the outer choice comes back
            assert lk.info()["forced_by"] == "use_backend('reference')"
        assert ops.chosen("remap_state", "cpu") == ("reference", "forced by LIFT_BACKEND=reference")
