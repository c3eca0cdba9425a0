"""Every recorded training run (tests/golden_trajectories.py) replays bit for bit.

The record was made on the project's CPU machine (torch 2.13, AVX512). Other torch builds or CPU
instruction sets may round BLAS and LAPACK differently; there the runs are held to 1e-5 relative
instead of bit equality, and the test says so.
"""
import pytest
import torch

from golden_trajectories import GOLDEN, RUNS, run

RECORD = torch.load(GOLDEN, weights_only=True)
SAME_MACHINE = (RECORD["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
                and RECORD["torch"].split("+")[0] == torch.__version__.split("+")[0])


def _compare(a, b, where):
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), where
        for k in a:
            _compare(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _compare(x, y, f"{where}[{i}]")
    else:
        assert a.dtype == b.dtype and a.shape == b.shape, where
        if SAME_MACHINE or a.dtype in (torch.int32, torch.int64):
            assert torch.equal(a, b), f"{where} differs from the recorded run"
        else:
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-6, msg=where)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_run_replays_bit_exact(name):
    assert name in RECORD["runs"], f"no record of {name}: run python tests/golden_trajectories.py"
    _compare(run(name), RECORD["runs"][name], name)
