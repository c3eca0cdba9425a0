"""The distributed test harness reports every rank of a failed run, not just the first exit code."""
import pytest
import torch.distributed as dist

import dist_harness_workers as workers
from dist_harness import run_ranks
from rank_reports import RanksFailed

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def test_every_rank_is_reported():
    with pytest.raises(RanksFailed) as info:
        run_ranks(3, workers.each_rank_fails_its_own_way, grace=10.0)
    report = str(info.value)
    rank0, rest = report.split("rank 1:", 1)
    rank1, rank2 = rest.split("rank 2:", 1)
    # the hung rank: stopped, with its Python stack showing where it was
    assert "stopped by the harness" in rank0 and "in each_rank_fails_its_own_way" in rank0, report
    # the raising rank: its traceback
    assert "exited with code 1" in rank1, report
    assert "ValueError: rank 1 refuses this step" in rank1 and "raise ValueError" in rank1, report
    # the aborted rank: the signal named, and its stack at the abort
    assert "killed by signal SIGABRT" in rank2 and "Fatal Python error: Aborted" in rank2, report
    assert "in each_rank_fails_its_own_way" in rank2, report


def test_a_late_python_callback_does_not_abort_a_rank():
    """Under interpreter finalization, CPython ends a thread that asks for the GIL with
    pthread_exit(), which inside C++ is std::terminate: with a normal interpreter exit this run
    kills rank 1 with SIGABRT, "terminate called without an active exception" (issue 18, item 9).
    The harness's ranks end without finalizing."""
    run_ranks(2, workers.python_callback_outlives_the_body)
