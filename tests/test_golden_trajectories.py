"""Every recorded training run (tests/golden_trajectories.py) replays: bit for bit on the machine that
recorded it, within a stated tolerance elsewhere.

Bit equality holds only where everything that rounds is the same: CPU vendor and model, torch build,
its BLAS and LAPACK, and the environment variables that steer them (machine_numerics.py). MKL picks
other GEMM and LAPACK kernels on an Intel Xeon than on an AMD EPYC even when both report AVX-512, so
the forward and backward passes round differently and the fp32 runs depart by a few ulps. On any
other machine the replay therefore checks:
- every selection (``idx``) exactly: a trajectory that selects other entries is another trajectory;
- every float tensor (losses, weights, moments, masters) to a norm-wise relative error of TOLERANCE.
TOLERANCE sits between the two things it must tell apart. Other BLAS paths forced on the recording
machine (MKL_CBWR=AVX2, COMPATIBLE, SSE4_2 with ATEN_CPU_CAPABILITY=default) moved every run by at
most 5e-7; an lr larger by one part in 10^4, the smallest real change tried, moves the fp32 runs by
at least 2.9e-5. A one-ulp change in the step is below what any tolerance can tell from BLAS
rounding: the bit-exact replay catches it, and tests/test_golden_sparse_adamw_step.py catches it on
every AVX2 or AVX-512 machine.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import lift_kernels.ops
from golden_trajectories import GOLDEN, RUNS, run
from machine_numerics import differences, fingerprint

RECORD = torch.load(GOLDEN, weights_only=True)
MACHINE_DIFFERENCES = differences(RECORD["machine"], fingerprint())
BIT_EXACT = not MACHINE_DIFFERENCES
TOLERANCE = 1e-5


def replay_mode() -> str:
    """One line for the test report: how the runs are compared here, and why."""
    if BIT_EXACT:
        return "golden trajectories: bit for bit (this is the machine that recorded them)"
    return ("golden trajectories: selections exact, floats within {:g} norm-wise (recorded on another machine: "
            "{})".format(TOLERANCE, "; ".join(MACHINE_DIFFERENCES)))


def compare(a, b, where: str, exact: bool) -> None:
    """Assert that the nested lists/dicts of tensors ``a`` (replayed) and ``b`` (recorded) agree."""
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), where
        for k in a:
            compare(a[k], b[k], f"{where}.{k}", exact)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            compare(x, y, f"{where}[{i}]", exact)
    else:
        assert a.dtype == b.dtype and a.shape == b.shape, where
        if exact or not a.dtype.is_floating_point:
            assert torch.equal(a, b), f"{where} differs from the recorded run ({replay_mode()})"
            return
        err = (a.double() - b.double()).norm() / b.double().norm().clamp_min(torch.finfo(torch.float32).tiny)
        assert err <= TOLERANCE, f"{where} departs from the recorded run by {err:.3g} > {TOLERANCE:g} ({replay_mode()})"


@pytest.mark.parametrize("name", sorted(RUNS))
def test_run_replays(name):
    assert name in RECORD["runs"], f"no record of {name}: run python tests/golden_trajectories.py"
    compare(run(name), RECORD["runs"][name], name, exact=BIT_EXACT)


def _wrap_step(monkeypatch, wrapper) -> None:
    """Route every sparse AdamW step of the optimizer through ``wrapper(real_step, *args, **kwargs)``."""
    real = lift_kernels.ops.sparse_adamw_step
    monkeypatch.setattr(lift_kernels.ops, "sparse_adamw_step", lambda *a, **kw: wrapper(real, *a, **kw))


def test_a_one_ulp_change_in_the_step_breaks_the_bit_exact_replay(monkeypatch):
    """Replayed here against itself (so on any machine): one ulp more in one weight entry per step."""
    clean = run("lift_fast_fp32")

    def one_ulp_more(real, params, grads, idxs, *args, **kwargs):
        real(params, grads, idxs, *args, **kwargs)
        flat, i = params[0].view(-1), idxs[0][0].long()
        flat[i] = torch.nextafter(flat[i], torch.tensor(float("inf"), dtype=flat.dtype))

    _wrap_step(monkeypatch, one_ulp_more)
    with pytest.raises(AssertionError, match="differs from the recorded run"):
        compare(run("lift_fast_fp32"), clean, "lift_fast_fp32", exact=True)


@pytest.mark.parametrize("name", ["lift_fast_fp32", "random_fp32", "lift_density_smallest_resumed"])
def test_a_small_real_change_breaks_the_tolerance(monkeypatch, name):
    """An lr larger by one part in 10^4 departs beyond TOLERANCE (replayed here against itself)."""
    clean = run(name)
    _wrap_step(monkeypatch, lambda real, *a, **kw: real(*a, **{**kw, "lr": kw["lr"] * (1 + 1e-4)}))
    with pytest.raises(AssertionError, match="departs from the recorded run"):
        compare(run(name), clean, name, exact=False)


MKL = "Math Kernel Library" in torch.__config__.show()


@pytest.mark.skipif(not MKL, reason="this torch build has no MKL whose kernel path could be switched")
def test_another_blas_path_replays_within_the_tolerance():
    """MKL_CBWR=AVX2 makes MKL take another GEMM/LAPACK path on this CPU (on the recording machine it
    rounds like the other vendor's CPU does): the replay then departs from the record, and stays
    within the tolerance."""
    code = ("import json, sys, torch; sys.path.insert(0, %r); import test_golden_trajectories as t\n"
            "assert not t.BIT_EXACT, t.replay_mode()\n"
            "exact = []\n"
            "for name in sorted(t.RUNS):\n"
            "    replay = t.run(name)\n"
            "    t.compare(replay, t.RECORD['runs'][name], name, exact=False)\n"
            "    try: t.compare(replay, t.RECORD['runs'][name], name, exact=True); exact.append(name)\n"
            "    except AssertionError: pass\n"
            "print(json.dumps(exact))\n") % os.path.dirname(__file__)
    env = dict(os.environ, MKL_CBWR="AVX2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    if BIT_EXACT:  # on the recording machine, the switch must really change the fp32 runs' rounding
        still_exact = json.loads(out.stdout.strip().splitlines()[-1])
        assert "lift_fast_fp32" not in still_exact, out.stdout
