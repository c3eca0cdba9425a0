"""What dist_harness.py tells about each rank of a failed run: how it ended and what it left behind.

Each rank writes into the run's log folder: ``rank<r>.traceback`` (an exception out of the test
body), ``rank<r>.stderr`` (its fd 2: libstdc++'s "terminate called ..." lands there, not in any
Python object) and ``rank<r>.stacks`` (faulthandler: every thread's Python stack at a fatal signal,
or when the harness stopped it).
"""
from __future__ import annotations

import os
import signal
import sys

STDERR_TAIL_LINES = 200  # enough for torch's C++ stacks of every thread at a fatal signal


class RanksFailed(AssertionError):
    """A distributed test failed; the message has every rank's report."""


def rank_file(logs: str, rank: int, kind: str) -> str:
    return os.path.join(logs, f"rank{rank}.{kind}")


def _read(logs: str, rank: int, kind: str) -> str:
    try:
        with open(rank_file(logs, rank, kind), errors="replace") as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""


def how_it_ended(exitcode: int | None, stuck: bool) -> str:
    if stuck:
        return "still running after a peer failed (or past the run's timeout): stopped by the harness"
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return "exited normally" if exitcode == 0 else f"exited with code {exitcode}"


def _section(title: str, text: str) -> list[str]:
    return [f"  -- {title}:", *("    " + line for line in text.splitlines())] if text else []


def failure_report(logs: str, exitcodes: list[int | None], stuck: list[int]) -> str:
    lines = ["distributed run failed; every rank, in rank order:"]
    for rank, code in enumerate(exitcodes):
        lines.append(f"rank {rank}: {how_it_ended(code, rank in stuck)}")
        lines += _section("exception", _read(logs, rank, "traceback"))
        tail = _read(logs, rank, "stderr").splitlines()[-STDERR_TAIL_LINES:]
        lines += _section("stderr (last lines)", "\n".join(tail))
        lines += _section("thread stacks (faulthandler)", _read(logs, rank, "stacks"))
    return "\n".join(lines)


def echo_stderr(logs: str, world: int) -> None:
    """Every rank's stderr, prefixed, on ours (pytest shows it with the test's captured output)."""
    for rank in range(world):
        for line in _read(logs, rank, "stderr").splitlines():
            print(f"[rank {rank}] {line}", file=sys.stderr)
