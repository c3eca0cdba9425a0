"""Selection jobs on the CPU: side by side, one intra-op thread each, same result as one by one."""
from __future__ import annotations

import threading

import torch

import lift_kernels as lk
from lift_kernels.optim.cpu_threads import intra_op_threads, run_jobs


def _with_threads(n, fn):
    with intra_op_threads(n):
        return fn()


def test_jobs_run_side_by_side_with_one_thread_each_and_keep_their_order():
    seen = []

    def job(i):
        def run():
            seen.append((threading.get_ident(), torch.get_num_threads()))
            return i * i + torch.ones(300, 300).matmul(torch.ones(300, 2)).sum().item() * 0
        return run

    before = torch.get_num_threads()
    out = _with_threads(2, lambda: run_jobs([job(i) for i in range(6)], on_cpu=True))
    assert out == [i * i for i in range(6)]
    assert {threads for _, threads in seen} == {1}
    assert torch.get_num_threads() == before
    one_by_one = _with_threads(2, lambda: run_jobs([job(i) for i in range(3)], on_cpu=True, side_by_side=False))
    assert one_by_one == [0, 1, 4] and seen[-1] == (threading.get_ident(), 1)


def test_selection_does_not_depend_on_the_thread_count():
    torch.manual_seed(0)
    shapes = [(96, 64), (64, 96), (40, 72), (96, 64), (40, 72)]
    weights = [torch.randn(s) for s in shapes]

    def select():
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        opt = lk.LIFTAdamW(params, rank=2, lra_rank=4)
        opt._select_due(opt.param_groups[0], params)
        return [opt.state[p]["idx"] for p in params]

    one, two = _with_threads(1, select), _with_threads(2, select)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_jobs_stay_in_the_calling_thread_under_a_dispatch_mode():
    """FakeTensorMode and MemTracker are per-thread modes: selection jobs must not escape them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Threads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(threading.get_ident())
            return func(*args, **(kwargs or {}))

    def job():
        return torch.ones(8, 8).matmul(torch.ones(8, 2)).sum()

    with intra_op_threads(2), Threads() as mode:
        out = run_jobs([job for _ in range(4)], on_cpu=True)
    assert [float(o) for o in out] == [128.0] * 4
    assert mode.seen == {threading.get_ident()}
