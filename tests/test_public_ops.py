"""The public ops are documented functions (issue 19, item 7): help() and inspect.signature show their
arguments and what they compute, and they still are the torch ops (torch.compile sees the op)."""
import inspect
import pydoc

import pytest
import torch

import lift_kernels as lk
from lift_kernels.ops import library

PUBLIC = {"sparse_adamw_step": lk.sparse_adamw_step, "remap_state": lk.remap_state,
          "principal_weights": lk.principal_weights}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_signature_is_the_schemas(name):
    sig = inspect.signature(PUBLIC[name])
    schema = getattr(torch.ops.lift_kernels, name).default._schema
    assert list(sig.parameters) == [a.name for a in schema.arguments]
    for arg in schema.arguments:
        param = sig.parameters[arg.name]
        assert (param.kind is inspect.Parameter.KEYWORD_ONLY) == arg.kwarg_only, arg.name
        if arg.has_default_value():
            assert param.default == arg.default_value, arg.name
        else:
            assert param.default is inspect.Parameter.empty, arg.name


def test_signatures_read_as_python():
    assert str(inspect.signature(lk.principal_weights)) == (
        "(W: torch.Tensor, k: int, lra_rank: int, svd: str = 'fast', largest: bool = True, "
        "generator: torch._C.Generator | None = None) -> torch.Tensor")
    assert str(inspect.signature(lk.remap_state)) == (
        "(old_idx: torch.Tensor, new_idx: torch.Tensor, states: list[torch.Tensor]) -> list[torch.Tensor]")
    step = inspect.signature(lk.sparse_adamw_step)
    assert str(step.parameters["masters"]) == "masters: list[torch.Tensor | None] | None = None"
    assert step.parameters["lr"].kind is inspect.Parameter.KEYWORD_ONLY and step.return_annotation is None


@pytest.mark.parametrize("name, says", [
    ("principal_weights", ["(m, n)", "(b, m, n)", "int32", "(k,)", "(b, k)", "fp32, bf16, fp16 or fp64", "svd"]),
    ("sparse_adamw_step", ["in place", "length k_i", "fp32", "bf16", "masters", "step"]),
    ("remap_state", ["(k_old,)", "(k_new,)", "int32", "starts at 0"]),
])
def test_help_shows_the_signature_and_what_it_computes(name, says):
    text = pydoc.render_doc(PUBLIC[name], renderer=pydoc.plaintext)
    assert "OpOverloadPacket" not in text and "(*args, **kwargs)" not in text
    assert f"{name}(" in text and "lift_kernels" in text
    assert PUBLIC[name].__doc__ == library.DOCS[name]
    for phrase in says:
        assert phrase in text, phrase


def test_keyword_and_positional_calls_reach_the_op():
    W = torch.randn(12, 9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(lk.principal_weights(W, 10, 2, svd="exact"),
                       torch.ops.lift_kernels.principal_weights(W, k=10, lra_rank=2, svd="exact"))
    with pytest.raises(ValueError, match="lra_rank must be >= 1"):
        lk.principal_weights(W, k=10, lra_rank=0)


def test_torch_compile_sees_the_op_in_one_graph():
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm

    def remap(old, new, state):
        return lk.remap_state(old, new, [state * 2])[0]

    old = torch.tensor([1, 4, 6], dtype=torch.int32)
    new = torch.tensor([0, 4, 6], dtype=torch.int32)
    state = torch.tensor([1.0, 2.0, 3.0])
    out = torch.compile(remap, backend=record, fullgraph=True)(old, new, state)
    assert out.tolist() == [0.0, 4.0, 6.0]
    packet = torch.ops.lift_kernels.remap_state
    targets = [node.target for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert packet in targets or packet.default in targets, targets


def _backends_of(op: str) -> list:
    from lift_kernels.ops import backends
    params = []
    for dev in backends.devices():
        for name in backends.BACKENDS:
            if not backends.implements(name, op):
                continue  # triton has no principal_weights: forcing it leaves the op at its default
            why = backends._why_not(op, name, dev)
            params.append(pytest.param(name, dev, marks=pytest.mark.skipif(why is not None, reason=str(why)),
                                       id=f"{name}-{dev}"))
    return params


@pytest.mark.parametrize("backend, device", _backends_of("principal_weights"))
@pytest.mark.parametrize("svd", ["fast", "exact"])
def test_principal_weights_of_a_weight_that_requires_grad(backend, device, svd):
    """A selection has no derivative: on a trainable weight (nn.Linear's, requires_grad=True) every
    backend selects what it selects from the detached weight, and neither the indices nor the
    low-rank factors of the fast path require grad or record a graph."""
    lin = torch.nn.Linear(40, 56).to(device)
    assert lin.weight.requires_grad
    with lk.ops.use_backend(backend):
        idx = lk.principal_weights(lin.weight, 300, 6, svd, generator=torch.Generator(device).manual_seed(4))
        plain = lk.principal_weights(lin.weight.detach(), 300, 6, svd, generator=torch.Generator(device).manual_seed(4))
        L, R = torch.ops.lift_kernels._lowrank(lin.weight.unsqueeze(0), 6, 4, 2, 4)
    assert torch.equal(idx, plain)
    assert not idx.requires_grad and idx.grad_fn is None
    assert not L.requires_grad and not R.requires_grad and L.grad_fn is None


@pytest.mark.parametrize("backend, device", _backends_of("principal_weights"))
@pytest.mark.parametrize("svd", ["fast", "exact"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_principal_weights_at_full_rank_are_the_largest_entries(backend, device, svd, dtype):
    """lra_rank >= min(m, n): the best rank-lra_rank approximation is W itself, so the selection is the
    top-k of |W| exactly (a 2 x 128 classifier head at lra_rank 64), not refused and not an
    approximation's rounding of it; no sketch is drawn from the generator."""
    W = torch.randn(3, 2, 128, generator=torch.Generator().manual_seed(5)).to(device, dtype)
    W[0, 1, 7] = W[0, 0, 3]  # a tie: the lower flat index wins, as topk_flat_indices breaks it
    for largest in (True, False):
        want = lk.reference.topk_flat_indices(W.abs().to(torch.float64), 100, largest)
        for lra_rank in (2, 64):
            g = torch.Generator(device).manual_seed(1)
            with lk.ops.use_backend(backend):
                got = lk.principal_weights(W, 100, lra_rank, svd, largest, generator=g)
                one = lk.principal_weights(W[1], 100, lra_rank, svd, largest)
            assert torch.equal(got, want) and torch.equal(one, want[1])
            assert torch.equal(g.get_state(), torch.Generator(device).manual_seed(1).get_state())
