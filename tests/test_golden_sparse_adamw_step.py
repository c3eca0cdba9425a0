"""sparse_adamw_step replays its recorded outputs (tests/golden_sparse_adamw_step.py), on the reference
and on the C++ kernel, each against its own record.

The C++ kernel is bit for bit on every x86 CPU whose torch kernels fuse multiply-adds (AVX2 and
AVX-512), whatever the vendor: it is elementwise IEEE arithmetic with a correctly rounded sqrt, no
BLAS, no reduction. The reference is torch's elementwise ops, whose vector sqrt and division paths
are not the same on every CPU of one capability (the record, made on an AMD EPYC, differs from an
Intel Xeon's replay by an ulp in a few entries), so it is held to the tolerance below everywhere;
a one-ulp change of the step is caught through the C++ kernel's bit-exact replay. At
torch's DEFAULT capability (no FMA) lerp and addcmul round twice, so there the replay is held to
an ulp of the weight's dtype (a few fp32 ulps of the largest entry for moments that cancel) instead. The Triton kernel is held to the reference in
test_sparse_adamw_step.py (the interpreter rounds through NumPy).
"""
import pytest
import torch

from golden_sparse_adamw_step import BACKENDS, GOLDEN, replay
from lift_kernels import ops
from lift_kernels.ops.backends import BackendUnavailableError, choose

RECORD = torch.load(GOLDEN, weights_only=True)
FMA_CAPABILITIES = ("AVX2", "AVX512")
BIT_EXACT = ((RECORD["cpu_capability"] in FMA_CAPABILITIES)
             == (torch.backends.cpu.get_cpu_capability() in FMA_CAPABILITIES))


def _assert_replays(got: dict, want: dict, where: str, bit_exact: bool) -> None:
    assert sorted(got) == sorted(want), where
    for key in want:
        for i, (g, w) in enumerate(zip(got[key], want[key], strict=True)):
            if bit_exact:
                assert torch.equal(g, w), f"{where}: {key}[{i}] differs from the recorded step"
            else:
                # a double rounding per lerp/addcmul (or another sqrt/division path): an ulp of the
                # dtype, or a few fp32 ulps of the tensor's largest entry where a moment cancels
                atol = 8 * torch.finfo(torch.float32).eps * w.abs().max().item() if w.numel() else 0.0
                torch.testing.assert_close(g, w, rtol=torch.finfo(g.dtype).eps, atol=atol,
                                           msg=lambda m: f"{where}: {key}[{i}]: {m}")


def _runnable(backend: str) -> None:
    try:
        choose("sparse_adamw_step", "cpu", backend)
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("name", sorted(RECORD["cases"]))
@pytest.mark.parametrize("backend", BACKENDS)
def test_step_replays_the_record(backend, name):
    _runnable(backend)
    case = RECORD["cases"][name]
    with ops.use_backend(backend):
        got = replay(ops.sparse_adamw_step, case["inputs"])
    _assert_replays(got, case["outputs"][backend], f"{backend} {name}", BIT_EXACT and backend == "native")


@pytest.mark.skipif(not BIT_EXACT, reason="without FMA kernels the replay is held to a tolerance, not to every bit")
def test_one_ulp_in_one_entry_is_caught():
    """The replay compares every bit: a step that is one ulp off in one weight entry fails it."""
    name = "float32_dense_nomaster"
    case = RECORD["cases"][name]

    def one_ulp_more(params, grads, idxs, *args, **kwargs):
        ops.sparse_adamw_step(params, grads, idxs, *args, **kwargs)
        flat, i = params[2].view(-1), idxs[2][350].long()
        flat[i] = torch.nextafter(flat[i], torch.tensor(float("inf")))

    _runnable("native")
    with ops.use_backend("native"):
        untouched = replay(ops.sparse_adamw_step, case["inputs"])
        got = replay(one_ulp_more, case["inputs"])
    _assert_replays(untouched, case["outputs"]["native"], name, bit_exact=True)
    with pytest.raises(AssertionError):
        _assert_replays(got, case["outputs"]["native"], name, bit_exact=True)
