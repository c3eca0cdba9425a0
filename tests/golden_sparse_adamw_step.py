"""Inputs and outputs of sparse_adamw_step recorded once, so that a change of its arithmetic by one
ulp is caught on every machine, not only on the one that recorded the training runs.

The step is elementwise IEEE arithmetic (no BLAS, no reduction), so its bits depend only on which
operations round: torch's CPU kernels fuse a*b+c into one rounding (FMA) where the CPU capability is
AVX2 or AVX-512 and not at DEFAULT, and the C++ kernel follows torch. The record stores its inputs
(random numbers are not portable across torch's vectorized generators) and the capability it was
made at. ``python tests/golden_sparse_adamw_step.py`` records tests/data/golden_sparse_adamw_step.pt
(only when the arithmetic is meant to change, with the compiled extension built); tests/test_golden_sparse_adamw_step.py replays it.
"""
from __future__ import annotations

import os

import torch

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden_sparse_adamw_step.pt")
# (weight dtype, gathered gradient, fp32 masters); every case steps three weights of odd shapes
CASES = [(torch.float32, False, False), (torch.float32, True, False), (torch.bfloat16, False, True),
         (torch.bfloat16, True, False), (torch.float16, True, True), (torch.float16, False, False)]
SHAPES = [((37, 23), 301), ((5, 7), 1), ((64, 19), 700)]
# (step, lr, beta1) of consecutive calls; beta1 < 0.5 takes torch.lerp's other formula
CALLS = [(1, 1e-2, 0.9), (2, 3e-3, 0.9), (9, 2e-2, 0.3)]
HP = dict(beta2=0.95, eps=1e-8, weight_decay=0.1)
# Each records its own outputs: the C++ kernel's sqrt is correctly rounded, torch's CPU sqrt is not
# always, so the two agree to about an ulp, not bit for bit (csrc/cpu/sparse_adamw_step_cpu.cpp).
BACKENDS = ("reference", "native")


def case_name(dtype: torch.dtype, gathered: bool, masters: bool) -> str:
    return f"{str(dtype).removeprefix('torch.')}_{'gathered' if gathered else 'dense'}_{'master' if masters else 'nomaster'}"


def make_inputs(dtype: torch.dtype, gathered: bool, masters: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    inputs = {"params": [], "idxs": [], "exp_avgs": [], "exp_avg_sqs": [], "masters": [], "grads": []}
    for shape, k in SHAPES:
        p = torch.randn(shape, generator=g).to(dtype)
        idx = torch.randperm(p.numel(), generator=g)[:k].sort().values.to(torch.int32)
        inputs["params"].append(p)
        inputs["idxs"].append(idx)
        inputs["exp_avgs"].append(0.01 * torch.randn(k, generator=g))
        inputs["exp_avg_sqs"].append(1e-4 * torch.rand(k, generator=g))
        inputs["masters"].append(p.view(-1)[idx.long()].float() if masters else None)
    for _ in CALLS:
        grads = [torch.randn(p.shape, generator=g).to(dtype) for p in inputs["params"]]
        if gathered:
            grads = [gr.view(-1)[i.long()].clone() for gr, i in zip(grads, inputs["idxs"])]
        inputs["grads"].append(grads)
    return inputs


def replay(step_fn, inputs: dict) -> dict:
    """CALLS of ``step_fn`` (the op's signature) on a copy of ``inputs``; the tensors it updated."""
    state = {k: [None if t is None else t.clone() for t in inputs[k]]
             for k in ("params", "idxs", "exp_avgs", "exp_avg_sqs", "masters")}
    masters = state["masters"] if any(m is not None for m in state["masters"]) else None
    for (step, lr, beta1), grads in zip(CALLS, inputs["grads"]):
        step_fn(state["params"], grads, state["idxs"], state["exp_avgs"], state["exp_avg_sqs"], masters,
                step=step, lr=lr, beta1=beta1, **HP)
    return {k: state[k] for k in ("params", "exp_avgs", "exp_avg_sqs")} | (
        {"masters": masters} if masters is not None else {})


if __name__ == "__main__":
    from lift_kernels import ops

    record = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cases": {}}
    for dtype, gathered, masters in CASES:
        inputs = make_inputs(dtype, gathered, masters)
        outputs = {}
        for backend in BACKENDS:
            with ops.use_backend(backend):
                outputs[backend] = replay(ops.sparse_adamw_step, inputs)
        record["cases"][case_name(dtype, gathered, masters)] = {"inputs": inputs, "outputs": outputs}
    torch.save(record, GOLDEN)
    print("wrote", GOLDEN)
