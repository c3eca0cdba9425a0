"""Test setup shared by every test file.

Without a GPU, Triton kernels are tested under the interpreter. TRITON_INTERPRET must be set before
triton decorates any kernel, so it is set here, before test modules import the kernels (and before
lift_kernels is imported below).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A package installed by a plain `pip install .` compiles lift_kernels._C on first use, and test modules
# decide at collection whether its kernels are there: build it (or load the cached build) first. Not
# where the test of that first use runs (test_jit_build.py, LIFT_TEST_JIT_COMPILE=1): it must see one.
if os.environ.get("LIFT_TEST_JIT_COMPILE") != "1":
    from lift_kernels.build import ensure

    ensure()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_report_header(config):
    """Say how the golden trajectories are compared on this machine (bit for bit only where recorded)."""
    try:
        from test_golden_trajectories import replay_mode
    except Exception as exc:  # noqa: BLE001  (a header must never stop the run; the test itself reports)
        return f"golden trajectories: cannot tell the replay mode ({exc!r})"
    return replay_mode()
