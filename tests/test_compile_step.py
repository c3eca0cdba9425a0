"""torch.compile(opt.step): compiled once, whatever the step number or the refreshes, and equal to eager.

LIFT's part of the step runs outside the graph (its decisions read each weight's int step), so
dynamo never specializes on a step number; the dense AdamW part is traced as torch.optim's is.
"""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import lift_kernels as lk
from helpers import TinyMLP, make_batch

HERE = Path(__file__).resolve().parent
STEPS = 20  # refreshes before steps 1, 10 and 20


def _run(step_fn, model, opt, batches):
    out = []
    for x, y in batches:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        step_fn()
        out.append([p.detach().clone() for p in model.parameters()])
    return out


def _setup(sparse):
    torch.manual_seed(0)
    model = TinyMLP()
    groups = [{"params": [model.up.weight, model.down.weight], "lift": True},
              {"params": [model.up.bias, *model.norm.parameters()], "lift": False}]
    opt = lk.LIFTAdamW(groups, lr=1e-2, rank=2, lra_rank=3, update_interval=10, sparse_grad=sparse)
    g = torch.Generator().manual_seed(1)
    return model, opt, [make_batch(generator=g) for _ in range(STEPS)]


@pytest.mark.parametrize("sparse", [False, True])
def test_compiled_step_compiles_once_and_matches_eager(sparse):
    torch._dynamo.reset()
    model, opt, batches = _setup(sparse)
    eager_model, eager_opt = copy.deepcopy((model, opt))
    counter = CompileCounter()
    compiled = torch.compile(opt.step, backend=counter)
    counts = []

    def step():
        compiled()
        counts.append(counter.frame_count)

    trajectory = _run(step, model, opt, batches)
    expected = _run(eager_opt.step, eager_model, eager_opt, batches)
    assert opt.state[model.up.weight]["selected_at"] == 20  # the refreshes happened
    # everything is compiled by the second step (the first selects, the second does not); the
    # refreshes at 10 and 20 and every new step number reuse it
    assert counts[1] == counts[-1], counts
    assert counts[-1] <= 4, counts
    _close(model, trajectory, expected)


def _close(model, trajectory, expected):
    """The LIFT weights' first step bit for bit (their kernel runs outside the graph, as in eager);
    after that, and for the dense part, to rounding: traced, torch's functional AdamW computes its
    bias corrections as tensor ops, which round differently from eager's Python floats, and the
    forward carries those differences into the LIFT weights' gradients."""
    names = [n for n, _ in model.named_parameters()]
    for name, p, q in zip(names, trajectory[0], expected[0]):
        if name in ("up.weight", "down.weight"):
            assert torch.equal(p, q), name
    for t, (ours, theirs) in enumerate(zip(trajectory, expected), start=1):
        for name, p, q in zip(names, ours, theirs):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"{name} at step {t}")


def inductor_matches_eager() -> None:
    """With inductor (what torch.compile uses by default), as above."""
    torch._dynamo.reset()
    model, opt, batches = _setup(False)
    eager_model, eager_opt = copy.deepcopy((model, opt))
    batches = batches[:11]
    trajectory = _run(torch.compile(opt.step), model, opt, batches)
    expected = _run(eager_opt.step, eager_model, eager_opt, batches)
    _close(model, trajectory, expected)


def test_inductor_compiled_step_matches_eager(tmp_path):
    """inductor_matches_eager in a child process with its own inductor cache and one compile thread.

    Inductor compiles C++ on this machine, caches it under /tmp for every later process and, by
    default, compiles in worker threads; a crash inside torch's compiler (a fatal signal, not an
    assertion of ours) would otherwise end the whole test session. In a child, a stale cache from
    another torch cannot reach it, and a crash is this test's failure, with the child's stack.
    """
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), TORCHINDUCTOR_COMPILE_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])))
    code = "import test_compile_step as t; t.inductor_matches_eager(); print('inductor step == eager')"
    run = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], cwd=HERE, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (f"the child exited with {run.returncode}"
                                 f"{' (killed by signal %d)' % -run.returncode if run.returncode < 0 else ''}:\n"
                                 f"{run.stdout[-3000:]}\n{run.stderr[-6000:]}")
    assert "inductor step == eager" in run.stdout
