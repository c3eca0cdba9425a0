"""Running a test body on several gloo ranks (spawned processes) and comparing ranks with each other.

Workers live in importable modules (dist_*_workers.py): spawned children import them by name.
When a rank fails, the spawning test fails with every rank's story (rank_reports.py): its
traceback, the signal that killed it, its stderr, and the Python stacks of its threads at a fatal
signal or when the harness had to stop it. One rank's failure usually makes the others fail too (a
peer's connection closes under a collective); the first failure is the cause, so all are shown
rather than whichever exit code the parent happened to see first.
"""
from __future__ import annotations

import faulthandler
import os
import signal
import socket
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import wait

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rank_reports import RanksFailed, echo_stderr, failure_report, rank_file

# A rank that outlives a failed peer by this long is stuck (in a collective the peer left): its
# stacks are dumped and it is killed. Long enough for a loaded 2-core machine to let it fail alone.
GRACE_S = 60.0
# A collective that waits this long for a peer raises (gloo's default is 30 minutes); healthy runs
# take about 2 minutes in all on a loaded 2-core machine, start-up included.
COLLECTIVE_TIMEOUT_S = 300.0
TIMEOUT_S = 1200.0  # the whole run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args, logs: str) -> None:
    # libstdc++'s "terminate called ..." and Python's fatal-error dumps go to the raw fd 2
    err = os.open(rank_file(logs, rank, "stderr"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(err, 2)
    torch._C._set_print_stack_traces_on_fatal_signal(True)  # C++ stacks of every thread, to stderr
    fault = open(rank_file(logs, rank, "stacks"), "w")  # kept open for the process's lifetime
    faulthandler.enable(fault, all_threads=True)  # Python stacks first, then torch's handler above
    faulthandler.register(signal.SIGUSR1, fault, all_threads=True)  # the harness asks for a stuck rank's
    torch.set_num_threads(1)  # CI has 2 cores for all ranks together
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    status = 1
    try:
        fn(rank, world, *args)
        dist.barrier()
        status = 0
    except BaseException:
        with open(rank_file(logs, rank, "traceback"), "w") as f:
            f.write(traceback.format_exc())
    finally:
        dist.destroy_process_group()
    _exit_without_finalizing(status)


def _exit_without_finalizing(status: int) -> None:
    """Ends the rank without tearing the interpreter down.

    gloo's worker threads outlive destroy_process_group() while anything references the group (DDP
    does: they are joined when the group is freed, at interpreter shutdown at the earliest), and
    they take the GIL on their own schedule: to run Python future callbacks (a comm hook's
    ``then``), and to free the Python objects of the tensors a collective held, after it has
    already woken its caller. CPython ends a thread that asks for the GIL while the interpreter is
    finalizing with pthread_exit(); inside C++ (a noexcept destructor) that is std::terminate,
    "terminate called without an active exception", SIGABRT, after a body that passed. A worker
    starved on a loaded machine can be that late. The verdict is written by now and nothing here
    needs finalizing, so the rank skips it (test_dist_harness.py shows the abort it avoids).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _wait_all(procs: list, timeout: float, grace: float) -> list[int]:
    """Waits until every rank has exited, or ``grace`` after the first failure, or ``timeout``;
    returns the ranks then still running."""
    pending = {p.sentinel: p for p in procs}
    deadline = time.monotonic() + timeout
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        for sentinel in wait(list(pending), timeout=left):
            proc = pending.pop(sentinel)
            proc.join()
            if proc.exitcode != 0:
                deadline = min(deadline, time.monotonic() + grace)
    return [procs.index(p) for p in pending.values()]


def _stop(procs: list, ranks: list[int]) -> None:
    """Dumps the stacks of ``ranks`` (faulthandler on SIGUSR1), then kills them."""
    if not ranks:
        return
    for r in ranks:
        os.kill(procs[r].pid, signal.SIGUSR1)
    time.sleep(2.0)  # faulthandler writes from the signal handler; give it a moment on a busy machine
    for r in ranks:
        procs[r].kill()
        procs[r].join()


def run_ranks(world: int, fn, *args, timeout: float = TIMEOUT_S, grace: float = GRACE_S) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; raises :class:`RanksFailed` with every
    rank's report if any rank fails or hangs."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="lift-ranks-") as logs:
        port = free_port()
        procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, logs)) for r in range(world)]
        for p in procs:
            p.start()
        try:
            stuck = _wait_all(procs, timeout, grace)
            _stop(procs, stuck)
        finally:  # an interrupted test (Ctrl-C) leaves no rank behind
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
        echo_stderr(logs, world)
        if stuck or any(p.exitcode != 0 for p in procs):
            raise RanksFailed(failure_report(logs, [p.exitcode for p in procs], stuck))


def gathered(obj) -> list:
    """Every rank's ``obj``, in rank order."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def ranks_agree(t: torch.Tensor) -> bool:
    """Whether every rank holds exactly this tensor (bitwise)."""
    return all(torch.equal(t, other) for other in gathered(t.detach().cpu()))
